"""prdp.py end to end on a tiny pipeline: its own metrics, resume, and a LoRA run."""
import json

import pytest
import torch
from safetensors.torch import load_file

import common
import prdp


def tiny_args(tiny_dir, prompt_file, output_dir, epochs=2, *extra):
    return ["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(output_dir),
            "--num-epochs", str(epochs), "--resolution", "32", "--num-steps", "3", "--sample-batch-size", "6",
            "--sample-batches-per-epoch", "1", "--train-batch-size", "3", "--gradient-accumulation-steps", "2",
            "--images-per-prompt", "3", "--grad-steps-per-epoch", "2", "--learning-rate", "1e-3", "--beta", "0.01",
            "--clip-eps", "1e-4", "--device", "cpu", "--seed", "4", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_dir, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("prdp") / "run"
    prdp.main(tiny_args(tiny_dir, prompt_file, out))
    return out


def test_reports_predicted_and_actual_differences_and_clipping(finished_run):
    rows = common.read_metrics(finished_run)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert r["actual_diff"] > 0  # the better image first
        assert 0 <= r["clipfrac"] <= 1 and r["loss"] > 0
    # the first gradient step of an epoch is at theta_old: nothing clipped; the second one has moved
    assert rows[1]["clipfrac"] > 0
    assert (finished_run / "unet" / "config.json").is_file()
    assert json.loads((finished_run / "config.json").read_text())["images_per_prompt"] == 3


def test_resume_continues_like_an_uninterrupted_run(finished_run, tiny_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    prdp.main(tiny_args(tiny_dir, prompt_file, out, 1))
    prdp.main(["--resume", str(out), "--num-epochs", "2"])
    for a, b in zip(common.read_metrics(out), common.read_metrics(finished_run), strict=True):
        for key in ("reward_mean", "loss", "predicted_diff", "actual_diff", "clipfrac"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key
    weights = "unet/diffusion_pytorch_model.safetensors"
    for name, value in load_file(str(out / weights)).items():
        torch.testing.assert_close(value, load_file(str(finished_run / weights))[name])


def test_lora_run_and_bad_settings(tiny_dir, prompt_file, tmp_path):
    prdp.main(tiny_args(tiny_dir, prompt_file, tmp_path / "lora", 1, "--lora-rank", "4"))
    assert (tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(common.UserError, match="whole prompts"):
        prdp.main(tiny_args(tiny_dir, prompt_file, tmp_path / "bad", 1, "--images-per-prompt", "2"))


def test_prompts_whose_images_all_tie_are_neither_referenced_nor_trained(tiny_dir, prompt_file, tmp_path,
                                                                          horse_only_reward):
    import speed
    # hand-computed: 3 images a prompt, sampling batches of 3 (one prompt), training batches of 1 prompt, up to 2 a
    # step, K = 2, T = 3. One prompt with pairs: reference 1 call a step (3); training 1 batch x (2K - 1) passes x 3
    # steps (9). Two: reference 2 calls a step (6); training 2 batches x 3 x 3 (18). None: no call.
    small = ("--sample-batch-size", "3", "--sample-batches-per-epoch", "2")
    args = common.parse_args(prdp.Args, tiny_args(tiny_dir, prompt_file, tmp_path / "x", 1, *small))
    for trained, reference, train in ((0, 0, 0), (1, 3, 9), (2, 6, 18)):
        calls = speed.minimum_calls("prdp", args, [{"trained_prompts": trained}])
        assert (calls["reference"], calls["train"]) == (reference, train)
    # a reward under which every prompt but the horse ties: only the horse's images cost reference and training calls
    argv = tiny_args(tiny_dir, prompt_file, tmp_path / "run", 4, *small, "--reward", horse_only_reward)
    with speed.count_unet_calls() as counts:
        prdp.main(argv)
    rows = common.read_metrics(tmp_path / "run")
    trained = [r["trained_prompts"] for r in rows]
    assert max(trained) >= 1 and min(trained) <= 1, trained  # the horse was drawn, and some prompt was skipped
    assert all(r["pairs"] == 3 * r["trained_prompts"] for r in rows)  # 3 pairs of 3 images, none tied
    assert counts == speed.minimum_calls("prdp", common.parse_args(prdp.Args, argv), rows)


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
