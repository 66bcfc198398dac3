"""d3po.py end to end on a tiny pipeline: an online run, a round of human feedback (sample, label, train), a
second round from the first one's LoRA, resume, and label files that do not match their round."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from plumbing import bookkeeping
import common
import d3po
from plumbing import human_feedback


def tiny_args(tiny_dir, prompt_file, output_dir, epochs=2, *extra):
    return ["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(output_dir),
            "--num-epochs", str(epochs), "--resolution", "32", "--num-steps", "4", "--sample-batch-size", "4",
            "--sample-batches-per-epoch", "2", "--train-batch-size", "2", "--gradient-accumulation-steps", "2",
            "--learning-rate", "3e-2", "--device", "cpu", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def online_run(tiny_dir, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("d3po") / "run"
    d3po.main(tiny_args(tiny_dir, prompt_file, out))
    return out


def test_online_run_writes_every_output(online_run):
    out = online_run
    rows = bookkeeping.read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("reward_mean", "reward_std", "loss", "accuracy", "clipfrac", "seconds"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert all(0 < r["pairs"] <= 4 for r in rows)  # 8 images = 4 pairs, ties dropped
    assert rows[1]["clipfrac"] > 0   # lr 3e-2 moved it past the clamp
    assert sorted(os.listdir(out / "samples")) == ["epoch_0000.png", "epoch_0001.png"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    assert not [f for f in os.listdir(out) if f.endswith((".tmp", ".old"))]


def test_resume_continues_like_an_uninterrupted_run(online_run, tiny_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    d3po.main(tiny_args(tiny_dir, prompt_file, out, 1))
    d3po.main(["--resume", str(out), "--num-epochs", "2"])
    for a, b in zip(bookkeeping.read_metrics(out), bookkeeping.read_metrics(online_run), strict=True):
        for key in ("reward_mean", "loss", "accuracy", "clipfrac"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key
    lora = "lora/pytorch_lora_weights.safetensors"
    for name, value in load_file(str(out / lora)).items():
        torch.testing.assert_close(value, load_file(str(online_run / lora))[name])


def test_several_rewards_use_pareto_dominance(tiny_dir, prompt_file, tmp_path):
    d3po.main(tiny_args(tiny_dir, prompt_file, tmp_path / "two", 1, "--reward",
                        "jpeg_compressibility,jpeg_incompressibility"))
    row = bookkeeping.read_metrics(tmp_path / "two")[0]
    # one reward is minus the other, so no image dominates: every pair is a draw and nothing is trained
    assert row["pairs"] == 0 and np.isnan(row["loss"])
    assert row["jpeg_compressibility_mean"] == pytest.approx(-row["jpeg_incompressibility_mean"])


def label(round_dir, name, scores):
    template = json.loads((round_dir / "labels_template.json").read_text())
    for entry, s in zip(template, scores):
        entry["scores"] = s
    (round_dir / "labels").mkdir(exist_ok=True)
    (round_dir / "labels" / name).write_text(json.dumps(template))


def round_args(tiny_dir, prompt_file, out, *extra):
    return ["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(out), "--resolution", "32",
            "--num-steps", "3", "--images-per-prompt", "3", "--sample-batch-size", "6", "--train-batch-size", "2",
            "--device", "cpu", *extra]


def copy_round(first_round, tmp_path):
    """A copy of the first round's files (not its labels) in tmp_path/round, for a test to label or damage."""
    r = tmp_path / "round"
    r.mkdir()
    for f in human_feedback.ROUND_FILES:
        (r / f).write_bytes((first_round / "round1" / f).read_bytes())
    return r


@pytest.fixture(scope="module")
def first_round(tiny_dir, prompt_file, tmp_path_factory):
    base = tmp_path_factory.mktemp("rounds")
    d3po.main(round_args(tiny_dir, prompt_file, base / "round1", "--sample-only"))
    return base


def test_sample_only_writes_trajectories_sheets_and_a_template(first_round):
    r = first_round / "round1"
    template = json.loads((r / "labels_template.json").read_text())
    assert [e["prompt"] for e in template] == ["a cat", "a dog", "a photo of a horse"]
    assert all(e["scores"] == [None] * 3 and (r / e["sheet"]).is_file() for e in template)
    t = load_file(str(r / "trajectories.safetensors"))
    assert t["latents"].shape == (9, 4, 4, 16, 16) and t["log_probs"].shape == (9, 3)
    torch.testing.assert_close(t["latents"][0::3, 0], t["latents"][1::3, 0], rtol=0, atol=0)  # one x_T per prompt
    assert not (r / "checkpoint.pt").exists()


def test_two_rounds_of_human_feedback(first_round, tiny_dir, prompt_file):
    r1 = first_round / "round1"
    label(r1, "alice.json", [[1, 0, 2], [0, 0, 0], [5, 1, 3]])
    label(r1, "bob.json", [[1, 2, 2], [0, 0, 0], [5, 1, 3]])  # means: [1, 1, 2], ties, [5, 1, 3]
    train1 = first_round / "train1"
    d3po.main(round_args(tiny_dir, prompt_file, train1, "--labels", str(r1), "--num-epochs", "2",
                         "--learning-rate", "1e-2"))
    rows = bookkeeping.read_metrics(train1)
    assert [r["pairs"] for r in rows] == [2 + 3, 2 + 3]  # prompt 0: (0,2), (1,2); prompt 2: all three pairs
    assert rows[1]["accuracy"] > 0 and "reward_mean" not in rows[0]
    assert (train1 / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert len(os.listdir(train1 / "samples")) == 2

    # round 2 samples from round 1's fine-tuned model, which becomes the new reference
    r2 = first_round / "round2"
    d3po.main(round_args(tiny_dir, prompt_file, r2, "--sample-only", "--start-from", str(train1)))
    trained, _, _ = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=0)  # no adapter of our own
    trained.load_lora_weights(str(train1 / "lora"))
    merged, _, _ = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=4, start_from=str(train1), reference=True)
    x, t, emb = torch.randn(2, 4, 16, 16), torch.tensor(500), common.encode_prompts(merged, ["a cat", "a dog"])
    with torch.no_grad():
        want = trained.unet(x, t, encoder_hidden_states=emb).sample
        got = merged.unet(x, t, encoder_hidden_states=emb).sample
        with common.reference_model(merged):
            ref = merged.unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-4)
    label(r2, "carol.json", [[0, 1, 2], [2, 1, 0], [1, 1, 0]])
    d3po.main(round_args(tiny_dir, prompt_file, first_round / "train2", "--labels", str(r2), "--num-epochs", "1"))
    assert json.loads((first_round / "train2" / "config.json").read_text())["start_from"] == str(train1)
    assert bookkeeping.read_metrics(first_round / "train2")[0]["pairs"] == 3 + 3 + 2


BAD_LABELS = {
    "wrong prompt count": ([[1, 2, 3]], "has 1 prompts but the round has 3"),
    "wrong number of scores": ([[1, 2, 3], [1, 2], [1, 2, 3]], "prompt 1 ('a dog'): 2 scores for 3 images"),
    "not a number": ([[1, 2, 3], [1, "good", 3], [1, 2, 3]],
                     "prompt 1 ('a dog'), image #1: score 'good' is not a number"),
    "left empty": ([[1, 2, 3], [1, 2, 3], [None, 2, 3]], "image #0: score None is not a number"),
    "too large for a float": ([[1, 2, 3], [1, 2, 10 ** 400], [1, 2, 3]], "image #2: score 10000000000000000000..."),
}


@pytest.mark.parametrize("case", BAD_LABELS)
def test_label_files_that_do_not_match_their_round_are_refused(case, first_round, tiny_dir, prompt_file, tmp_path):
    scores, message = BAD_LABELS[case]
    r = copy_round(first_round, tmp_path)
    template = json.loads((r / "labels_template.json").read_text())
    entries = [dict(template[i], scores=s) for i, s in enumerate(scores)]
    (r / "labels").mkdir()
    (r / "labels" / "dave.json").write_text(json.dumps(entries))
    with pytest.raises(common.UserError, match="dave.json") as error:
        d3po.main(round_args(tiny_dir, prompt_file, tmp_path / "out", "--labels", str(r)))
    assert message in str(error.value)


def test_a_round_whose_every_prompt_ties_is_refused_before_training(first_round, tiny_dir, prompt_file, tmp_path):
    r = copy_round(first_round, tmp_path)
    label(r, "erin.json", [[2, 2, 2], [0, 0, 0], [5, 5, 5]])
    with pytest.raises(common.UserError, match="all the images have the same score"):
        d3po.main(round_args(tiny_dir, prompt_file, tmp_path / "out", "--labels", str(r)))
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_a_round_without_labels_is_refused(first_round, tiny_dir, prompt_file, tmp_path):
    r = copy_round(first_round, tmp_path)
    with pytest.raises(common.UserError, match="no label files"):
        d3po.main(round_args(tiny_dir, prompt_file, tmp_path / "out", "--labels", str(r)))
    with pytest.raises(common.UserError, match="not a round written by d3po.py --sample-only"):
        d3po.main(round_args(tiny_dir, prompt_file, tmp_path / "out", "--labels", str(tmp_path)))
    (r / "labels_template.json").unlink()
    with pytest.raises(common.UserError, match="no labels_template.json there, so it is not a round"):
        d3po.main(round_args(tiny_dir, prompt_file, tmp_path / "out", "--labels", str(r)))


def test_training_on_a_round_takes_its_settings_and_says_which(first_round, tiny_dir, prompt_file, tmp_path,
                                                               capsys):
    """The stored log-probs are the reference's, so a round is trained with the steps, guidance, ... it was sampled
    with; a flag that says otherwise is replaced, and the run prints which."""
    r = copy_round(first_round, tmp_path)
    label(r, "erin.json", [[0, 1, 2], [2, 1, 0], [1, 1, 0]])
    out = tmp_path / "out"
    argv = round_args(tiny_dir, prompt_file, out, "--labels", str(r), "--num-epochs", "1")
    argv[argv.index("--num-steps") + 1] = "5"
    d3po.main(argv + ["--guidance-scale", "2.5"])
    said = [line for line in capsys.readouterr().out.splitlines() if "with its own settings" in line]
    assert len(said) == 1 and "--num-steps 3" in said[0] and "--guidance-scale 5.0" in said[0]
    assert "--resolution" not in said[0]  # unchanged settings are not listed
    config = json.loads((out / "config.json").read_text())
    assert config["num_steps"] == 3 and config["guidance_scale"] == 5.0


def test_reference_log_probs_are_computed_only_for_the_images_of_decided_pairs(tiny_dir, prompt_file, tmp_path,
                                                                                 horse_only_reward, monkeypatch):
    """Under a reward that ties every prompt but the horse, only the horse's pairs are decided. The test sees which
    prompts were sampled, and counts the UNet calls it expects from them: the reference model's for the images of
    the horse's pairs (in batches of --sample-batch-size 4, one call a batch and step), and training's for batches of
    --train-batch-size 2 images, one pair (one call a pair and step)."""
    import speed
    drawn = []
    sample_epoch = common.sample_epoch

    def recording(*a, **k):
        batch_prompts, samples = sample_epoch(*a, **k)
        drawn.append(batch_prompts)
        return batch_prompts, samples

    monkeypatch.setattr(common, "sample_epoch", recording)
    with speed.count_unet_calls() as counts:
        d3po.main(tiny_args(tiny_dir, prompt_file, tmp_path / "run", 3, "--reward", horse_only_reward))
    horse_pairs = [sum("horse" in p for p in prompts[0::2]) for prompts in drawn]  # 4 pairs an epoch
    assert len(drawn) == 3 and 0 < sum(horse_pairs) and min(horse_pairs) < 4, horse_pairs
    steps, sampling_batches = 4, 2
    assert counts == {"sample": 3 * sampling_batches * steps,
                      "reference": sum(-(-2 * n // 4) for n in horse_pairs) * steps,
                      "train": sum(horse_pairs) * steps}
    assert [r["pairs"] for r in bookkeeping.read_metrics(tmp_path / "run")] == horse_pairs


def test_a_round_trained_with_other_numerics_gets_its_reference_log_probs_computed_again(first_round, tiny_dir,
                                                                                        prompt_file, tmp_path):
    """The stored sampling log-probs are the reference's only when training computes log-probs as sampling did; a
    round sampled in float32 and trained under bf16 autocast has them computed again, with this run's numerics."""
    r = copy_round(first_round, tmp_path)
    label(r, "erin.json", [[0, 1, 2], [2, 1, 0], [1, 1, 0]])
    for mixed_precision, recomputed in (("no", False), ("bf16", True)):
        args = bookkeeping.parse_args(d3po.Args, round_args(tiny_dir, prompt_file, tmp_path / "out", "--labels", str(r),
                                                       "--mixed-precision", mixed_precision))
        d3po.check_args(args)
        policy, _ = common.load_policy(args, reference=True)
        _, samples, _, _, ref_log_probs = human_feedback.load_round(policy, args)
        # expected: a pipeline loaded apart, with no adapters at all, under this run's autocast, step by step
        pipe, _, autocast = common.load_pipeline(tiny_dir, "cpu", mixed_precision, lora_rank=0, resolution=32)
        pipe.scheduler.set_timesteps(args.num_steps)
        base = common.Policy(pipe, common.encode_prompts(pipe, [""]), args.num_steps, args.guidance_scale, args.eta,
                             autocast)
        with torch.no_grad():
            expected = torch.stack([common.log_prob(base, samples, torch.arange(len(samples.images)), s)
                                    for s in range(args.num_steps)], 1)
        torch.testing.assert_close(ref_log_probs, expected, rtol=0, atol=1e-6)
        assert torch.equal(ref_log_probs, samples.log_probs) != recomputed
        if recomputed:  # bf16's log-probs differ from the stored float32 ones (by 0.05 on 2026-12-06)
            assert (samples.log_probs - expected).abs().max() > 1e-2


def test_training_into_the_round_itself_is_refused_and_the_round_is_left_as_it_was(first_round, tiny_dir, prompt_file,
                                                                                    tmp_path):
    r = copy_round(first_round, tmp_path)
    label(r, "frank.json", [[0, 1, 2], [2, 1, 0], [1, 1, 0]])
    before = {f: (r / f).read_bytes() for f in human_feedback.ROUND_FILES}
    with pytest.raises(common.UserError, match=r"holds a d3po.py round of human feedback \(--sample-only\), which "
                                               r"d3po.py must not write into; choose another --output-dir"):
        d3po.main(round_args(tiny_dir, prompt_file, r, "--labels", str(r)))
    assert {f: (r / f).read_bytes() for f in human_feedback.ROUND_FILES} == before
    assert not (r / "checkpoint.pt").exists()


def test_damaged_rounds_and_start_points_are_refused_in_one_sentence(first_round, tiny_dir, prompt_file, tmp_path):
    r = copy_round(first_round, tmp_path)
    label(r, "gina.json", [[0, 1, 2], [2, 1, 0], [1, 1, 0]])
    (r / "labels" / "notes.json").mkdir()  # a directory that looks like a label file is not read as one
    full = (r / "trajectories.safetensors").read_bytes()
    (r / "trajectories.safetensors").write_bytes(full[:len(full) // 2])  # cut short
    with pytest.raises(common.UserError, match="trajectories.safetensors cannot be read"):
        d3po.main(round_args(tiny_dir, prompt_file, tmp_path / "out", "--labels", str(r)))
    (r / "trajectories.safetensors").write_bytes(full)
    d3po.main(round_args(tiny_dir, prompt_file, tmp_path / "out", "--labels", str(r), "--num-epochs", "1"))
    (r / "labels" / "hank.json").write_bytes(b"\xff\xfe[{\x00\x81")
    with pytest.raises(common.UserError, match="hank.json is not UTF-8 text; it must be a JSON list"):
        d3po.main(round_args(tiny_dir, prompt_file, tmp_path / "out2", "--labels", str(r)))
    lora = tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[:100])
    for start in (tmp_path / "out", tmp_path / "labels-only"):  # a truncated file; a directory without weights
        start.mkdir(exist_ok=True)
        with pytest.raises(common.UserError, match="no finished run's weights .lora/ or unet/. for this model can be"):
            d3po.main(round_args(tiny_dir, prompt_file, tmp_path / "next", "--sample-only", "--start-from",
                                 str(start)))


def test_a_round_of_the_toy_model_trains_with_the_toy_preset_unless_a_flag_says_otherwise(tmp_path):
    """`d3po.py --labels R` is given no --model: the round's model decides the preset, as --model toy would."""
    r = tmp_path / "round"
    r.mkdir()
    bookkeeping.write_config(bookkeeping.parse_args(d3po.Args, ["--model", "toy", "--sample-only", "--output-dir",
                                                                str(r)], presets=d3po.PRESETS))
    for f in human_feedback.ROUND_FILES[1:]:  # present; what they hold is not read before the model loads
        (r / f).write_text("")
    args = bookkeeping.parse_args(d3po.Args, ["--labels", str(r), "--output-dir", str(tmp_path / "a")],
                                  presets=d3po.PRESETS)
    d3po.check_args(args)
    toy = d3po.PRESETS["toy"]
    assert args.model == "toy" and args.prompt_file == str(r / "prompts.txt")
    for name in ("reward", "learning_rate", "lora_rank", "train_batch_size", "gradient_accumulation_steps",
                 "num_epochs"):
        assert getattr(args, name) == toy[name], name
    given = bookkeeping.parse_args(d3po.Args, ["--labels", str(r), "--output-dir", str(tmp_path / "b"),
                                               "--learning-rate", "1e-4"], presets=d3po.PRESETS)
    assert given.learning_rate == 1e-4 and given.lora_rank == toy["lora_rank"]
