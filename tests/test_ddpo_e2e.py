"""ddpo.py end to end on a tiny pipeline: outputs, LoRA loading in diffusers, and resuming."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from plumbing import bookkeeping
import common
import ddpo


def tiny_args(tiny_dir, prompt_file, output_dir, epochs=2, *extra):
    return ["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(output_dir),
            "--num-epochs", str(epochs), "--resolution", "32", "--num-steps", "4", "--sample-batch-size", "4",
            "--sample-batches-per-epoch", "2", "--train-batch-size", "2", "--gradient-accumulation-steps", "2",
            "--learning-rate", "3e-2", "--clip-range", "0.2", "--device", "cpu", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_dir, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpo") / "run"
    ddpo.main(tiny_args(tiny_dir, prompt_file, out))
    return out


def test_writes_every_output(finished_run):
    out = finished_run
    config = json.loads((out / "config.json").read_text())
    assert config["num_epochs"] == 2 and config["estimator"] == "is" and config["num_steps"] == 4
    rows = bookkeeping.read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("reward_mean", "reward_std", "loss", "seconds", "approx_kl", "clipfrac"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[0]["reward_mean"] < 0  # jpeg_compressibility is minus a size
    assert sorted(os.listdir(out / "samples")) == ["epoch_0000.png", "epoch_0001.png"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoint.pt").is_file()
    assert (out / "curves.png").is_file()
    assert not [f for f in os.listdir(out) if f.endswith((".tmp", ".old"))]


def test_lora_loads_into_a_fresh_pipeline_and_changes_its_images(finished_run, tiny_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a cat", num_inference_steps=4, height=32, width=32, guidance_scale=5.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = generate()
    pipe.load_lora_weights(str(finished_run / "lora"))
    after = generate()
    assert (after - before).abs().max() > 1e-3

    # and the loaded LoRA is the trained model: the same UNet output as our own checkpoint gives
    ours, params, _ = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=4)
    optimizer = common.make_optimizer(params, 1e-3, 0.0)
    bookkeeping.load_checkpoint(ours, optimizer, common.make_scaler("cpu", "no"), str(finished_run))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(400)
    emb = common.encode_prompts(ours, ["a cat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=emb).sample,
                                   ours.unet(x, t, encoder_hidden_states=emb).sample, atol=1e-5, rtol=1e-4)


def test_resume_continues_like_an_uninterrupted_run(finished_run, tiny_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    ddpo.main(tiny_args(tiny_dir, prompt_file, out, 1))
    ddpo.main(["--resume", str(out), "--num-epochs", "2"])
    resumed, straight = bookkeeping.read_metrics(out), bookkeeping.read_metrics(finished_run)
    assert [r["epoch"] for r in resumed] == [0, 1]
    for a, b in zip(resumed, straight):
        for key in ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key
    for name, value in load_file(str(out / "lora" / "pytorch_lora_weights.safetensors")).items():
        straight = load_file(str(finished_run / "lora" / "pytorch_lora_weights.safetensors"))
        torch.testing.assert_close(value, straight[name])
    assert json.loads((out / "config.json").read_text())["num_epochs"] == 2


def test_training_moves_the_policy(finished_run):
    """After the first optimiser step the ratio departs from 1, so some steps are clipped."""
    rows = bookkeeping.read_metrics(finished_run)
    assert rows[-1]["clipfrac"] > 0 and rows[-1]["approx_kl"] > 0


def test_score_function_estimator_and_full_fine_tuning_run(tiny_dir, prompt_file, tmp_path):
    """DDPO_SF takes one optimiser step an epoch (Sec. 4.3): all 8 samples in it; a second step in the epoch, or a
    second pass over the samples, would train on an older policy's samples with no importance weight."""
    one_step = ("--estimator", "sf", "--gradient-accumulation-steps", "4")
    steps = []
    original = common.optimizer_step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "optimizer_step", lambda *a: steps.append(1) or original(*a))
        ddpo.main(tiny_args(tiny_dir, prompt_file, tmp_path / "sf", 1, *one_step, "--lora-rank", "0",
                            "--learning-rate", "1e-4", "--timestep-fraction", "0.5",
                            "--reward", "jpeg_incompressibility"))
    assert len(steps) == 1
    rows = bookkeeping.read_metrics(tmp_path / "sf")
    assert rows[0]["reward_mean"] > 0 and rows[0]["clipfrac"] == 0  # one step: theta = theta_old throughout
    assert (tmp_path / "sf" / "unet" / "config.json").is_file()
    for more in (("--gradient-accumulation-steps", "2"), (*one_step, "--inner-epochs", "2")):
        with pytest.raises(common.UserError, match="one optimiser step an epoch"):
            ddpo.main(tiny_args(tiny_dir, prompt_file, tmp_path / "bad", 1, "--estimator", "sf", *more))


def test_refuses_to_overwrite_a_run(finished_run, tiny_dir, prompt_file):
    with pytest.raises(common.UserError, match="already holds a run"):
        ddpo.main(tiny_args(tiny_dir, prompt_file, finished_run))


def test_resuming_a_run_saved_without_fp16_scaling_with_it_starts_the_scaler_afresh(finished_run, tiny_dir, capsys):
    """A CPU run resumed on CUDA with fp16: the saved scaler state is empty (scaling was off), and loading it into an
    active scaler used to fail. An active CPU scaler stands in for CUDA's here."""
    pipe, params, _ = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=4)
    optimizer = common.make_optimizer(params, 3e-2, 1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    next_epoch, extra = bookkeeping.load_checkpoint(pipe, optimizer, scaler, str(finished_run))
    assert next_epoch == 2 and "stats" in extra
    assert scaler.is_enabled() and scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()  # a fresh scale
    assert "the scaler starts afresh" in capsys.readouterr().out
    # and the other way round: a scaler's state saved by an fp16 run, resumed without scaling
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    assert saved.state_dict()["scale"] == 1024.0
    quiet = common.make_scaler("cpu", "no")
    quiet.load_state_dict(saved.state_dict())
    assert not quiet.is_enabled()
