"""prdp.py end to end on a tiny pipeline: its own metrics, resume, and a LoRA run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from plumbing import bookkeeping
import common
import prdp
from plumbing.rewards import compute_rewards


def tiny_args(tiny_dir, prompt_file, output_dir, epochs=2, *extra):
    return ["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(output_dir),
            "--num-epochs", str(epochs), "--resolution", "32", "--num-steps", "3", "--sample-batch-size", "6",
            "--sample-batches-per-epoch", "1", "--train-batch-size", "3", "--gradient-accumulation-steps", "2",
            "--images-per-prompt", "3", "--grad-steps-per-epoch", "2", "--learning-rate", "1e-3", "--beta", "0.01",
            "--clip-eps", "1e-4", "--device", "cpu", "--seed", "4", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_dir, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("prdp") / "run"
    scored = []
    with pytest.MonkeyPatch.context() as patch:  # the rewards each epoch got, to check the metrics against
        patch.setattr(prdp, "compute_rewards", lambda *a: scored.append(compute_rewards(*a)) or scored[-1])
        prdp.main(tiny_args(tiny_dir, prompt_file, out))
    return out, scored


def test_reports_predicted_and_actual_differences_and_clipping(finished_run):
    """actual_diff is the mean |r_a - r_b| over each trained prompt's pairs (every step of the epoch covers every
    prompt with a pair here: two prompts of three images, two a gradient step), computed here from the rewards."""
    out, scored = finished_run
    rows = bookkeeping.read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1] and len(scored) == 2
    for row, rewards in zip(rows, scored):
        per_prompt = []
        for group in rewards.view(-1, 3).tolist():
            diffs = [abs(a - b) for i, a in enumerate(group) for b in group[i + 1:] if a != b]
            if diffs:
                per_prompt.append(sum(diffs) / len(diffs))
        assert row["trained_prompts"] == len(per_prompt) > 0
        assert row["actual_diff"] == pytest.approx(sum(per_prompt) / len(per_prompt), rel=1e-5)
    # the first gradient step of an epoch is at theta_old: nothing clipped; the second one has moved
    assert rows[1]["clipfrac"] > 0
    assert (out / "unet" / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["images_per_prompt"] == 3


def test_resume_continues_like_an_uninterrupted_run(finished_run, tiny_dir, prompt_file, tmp_path):
    finished_run, _ = finished_run
    out = tmp_path / "run"
    prdp.main(tiny_args(tiny_dir, prompt_file, out, 1))
    prdp.main(["--resume", str(out), "--num-epochs", "2"])
    for a, b in zip(bookkeeping.read_metrics(out), bookkeeping.read_metrics(finished_run), strict=True):
        for key in ("reward_mean", "loss", "predicted_diff", "actual_diff", "clipfrac"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key
    weights = "unet/diffusion_pytorch_model.safetensors"
    for name, value in load_file(str(out / weights)).items():
        torch.testing.assert_close(value, load_file(str(finished_run / weights))[name])


def test_lora_run_and_bad_settings(tiny_dir, prompt_file, tmp_path):
    prdp.main(tiny_args(tiny_dir, prompt_file, tmp_path / "lora", 1, "--lora-rank", "4"))
    assert (tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(common.UserError, match="whole groups of the 2 images"):
        prdp.main(tiny_args(tiny_dir, prompt_file, tmp_path / "bad", 1, "--images-per-prompt", "2"))
    with pytest.raises(common.UserError, match="below the 3 images compared together, must divide them"):
        prdp.main(tiny_args(tiny_dir, prompt_file, tmp_path / "bad", 1, "--train-batch-size", "2",
                            "--gradient-accumulation-steps", "3"))


def test_a_training_batch_smaller_than_a_prompts_images_trains_the_same_steps(finished_run, tiny_dir, prompt_file,
                                                                              tmp_path):
    """--train-batch-size 1 with 3 images a prompt: UNet batches of one image, the same optimiser steps of two
    whole prompts (6 accumulated batches instead of 2 of 3), so the same losses (test_prdp_loss checks that the
    gradient is the same; Adam's first steps, about lr x sign(g), make weights a poor witness of float-level
    differences in g)."""
    import speed
    out = tmp_path / "chunked"
    argv = tiny_args(tiny_dir, prompt_file, out, 1, "--train-batch-size", "1", "--gradient-accumulation-steps", "6")
    with speed.count_unet_calls() as counts:
        prdp.main(argv)
    chunked, whole = bookkeeping.read_metrics(str(out))[0], bookkeeping.read_metrics(str(finished_run[0]))[0]
    minimum = speed.minimum_calls("prdp", bookkeeping.parse_args(prdp.Args, argv), [chunked])
    assert counts["train"] == minimum["train"] and counts["reference"] == minimum["reference"]
    assert chunked["reward_mean"] == whole["reward_mean"] and chunked["pairs"] == whole["pairs"]
    for key in ("loss", "predicted_diff"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-3, abs=1e-7), key


def test_prompts_whose_images_all_tie_are_neither_referenced_nor_trained(tiny_dir, prompt_file, tmp_path,
                                                                          horse_only_reward, monkeypatch):
    """Under a reward that ties every prompt but the horse, only the horse's images cost reference and training
    calls. The test sees which prompts were drawn (two prompts of 3 images an epoch) and counts by hand, with T = 3:
    the reference model once per step for each horse prompt (sampling batches of 3 images, one prompt); training in
    batches of one prompt, up to 2 a gradient step, K = 2 steps: the first at theta_old (T calls a batch), the second
    recomputing the log-probs without a graph first (2T calls a batch)."""
    import speed
    drawn = []
    sample_epoch = common.sample_epoch

    def recording(*a, **k):
        batch_prompts, samples = sample_epoch(*a, **k)
        drawn.append(batch_prompts[0::3])
        return batch_prompts, samples

    monkeypatch.setattr(common, "sample_epoch", recording)
    small = ("--sample-batch-size", "3", "--sample-batches-per-epoch", "2")
    with speed.count_unet_calls() as counts:
        prdp.main(tiny_args(tiny_dir, prompt_file, tmp_path / "run", 4, *small, "--reward", horse_only_reward))
    horses = [sum("horse" in p for p in prompts) for prompts in drawn]
    assert len(horses) == 4 and max(horses) >= 1 and min(horses) <= 1, horses  # some epoch skipped a prompt
    T = 3
    assert counts == {"sample": 4 * 2 * T, "reference": sum(horses) * T,
                      "train": sum(min(2, h) * T + min(2, h) * 2 * T for h in horses)}
    rows = bookkeeping.read_metrics(tmp_path / "run")
    assert [r["trained_prompts"] for r in rows] == horses
    assert all(r["pairs"] == 3 * r["trained_prompts"] for r in rows)  # 3 pairs of 3 images, none tied


@pytest.mark.parametrize("shared", [False, True])
def test_shared_noise_starts_the_images_of_a_prompt_from_one_x_T(shared, tiny_dir, prompt_file, tmp_path,
                                                                  monkeypatch):
    drawn = []
    sample_epoch = common.sample_epoch

    def recording(*a, **k):
        batch_prompts, samples = sample_epoch(*a, **k)
        drawn.append(samples.latents[:, 0].reshape(2, 3, -1))  # 6 images = 2 prompts x 3, x_T of each
        return batch_prompts, samples

    monkeypatch.setattr(common, "sample_epoch", recording)
    flag = "--shared-noise" if shared else "--no-shared-noise"
    prdp.main(tiny_args(tiny_dir, prompt_file, tmp_path / "run", 1, flag))
    x_T = drawn[0]
    same = [torch.equal(x_T[p, 0], x_T[p, i]) for p in range(2) for i in (1, 2)]
    assert all(same) if shared else not any(same)
    assert not torch.equal(x_T[0, 0], x_T[1, 0])  # prompts still differ
