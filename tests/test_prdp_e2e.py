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
