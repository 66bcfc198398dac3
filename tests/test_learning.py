"""The benchmarks' own machinery: benchmarks/shapes.py (flags, prompts, a run stopped at its wall-clock budget) and
benchmarks/compare.py (its KL estimate against the Gaussian steps' closed form, its table and figure). That each
toy preset learns is checked by tests/test_quickstart.py, which runs the README's quick starts (the DDIM toy's
with --long)."""
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from plumbing import bookkeeping
import common
import compare
import d3po
import shapes
from conftest import ROOT


def test_a_run_with_a_budget_stops_on_time_with_its_last_epoch_whole(tmp_path):
    tiny = ["--num-epochs", "1000", "--num-steps", "3", "--sample-batch-size", "8", "--sample-batches-per-epoch", "1",
            "--train-batch-size", "8", "--gradient-accumulation-steps", "1"]
    args, run_dir, seconds = shapes.fine_tune("ddpo", 0, tiny, str(tmp_path), minutes=0.2)
    assert 12 <= seconds < 18 and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logged = len(f.read().splitlines())
    policy, params = common.load_policy(args)
    epochs, _ = bookkeeping.load_checkpoint(policy.pipe, common.make_optimizer(params, 1e-3, 0),
                                            common.make_scaler("cpu", "no"), run_dir)
    assert 1 <= logged < 1000 and epochs in (logged, logged - 1)  # stopped between two writes at most
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]
    assert os.path.realpath(run_dir) not in bookkeeping.HELD  # the directory is let go of


def test_kl_estimate_is_zero_at_the_start_and_agrees_with_the_closed_form_of_the_gaussian_steps(tmp_path):
    """KL(p_theta || p_ref) of trajectories is E_theta[sum_t KL of step t], and two Gaussian steps of one variance
    have KL |mu_theta - mu_ref|^2 / (2 sigma^2): the means from diffusers' DDIMScheduler.step with zero noise."""
    args = bookkeeping.parse_args(d3po.Args, ["--model", "toy", "--lora-rank", "4", "--output-dir", str(tmp_path)],
                                  presets=d3po.PRESETS)
    policy, _ = common.load_policy(args, reference=True)
    prompts = bookkeeping.load_prompts(args.prompt_file)[:4]
    start, grid = shapes.measure(policy, dataclasses.replace(args, sample_batch_size=8), prompts, 8, kl=True)
    assert np.abs(start["kl"]).max() < 1e-2
    eval_prompts = [p for p in prompts for _ in range(8)]  # the noise common.evaluate draws, whatever the batch
    assert torch.equal(grid, common.evaluate(policy, eval_prompts, shapes.EVAL_SEED)[::8])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 5e-2)
    got, _ = shapes.measure(policy, args, prompts, 8, kl=True)
    generator = torch.Generator("cpu").manual_seed(shapes.EVAL_SEED)  # the same trajectories again
    _, samples = common.sample_epoch(policy, args, [p for p in prompts for _ in range(8)], generator, draw=False,
                                     progress=False)
    scheduler = DDIMScheduler.from_config(policy.pipe.scheduler.config)
    scheduler.set_timesteps(args.num_steps)
    closed = torch.zeros(len(samples.latents), dtype=torch.float64)
    unet, embeds = policy.pipe.unet, samples.prompt_embeds
    for s, t in enumerate(samples.timesteps):
        x = samples.latents[:, s]
        with torch.no_grad():
            eps = unet(x, t, encoder_hidden_states=embeds).sample
            with common.reference_model(policy.pipe):
                eps_ref = unet(x, t, encoder_hidden_states=embeds).sample
        zero = torch.zeros_like(x)
        mean = scheduler.step(eps, t, x, eta=args.eta, variance_noise=zero).prev_sample
        mean_ref = scheduler.step(eps_ref, t, x, eta=args.eta, variance_noise=zero).prev_sample
        variance = args.eta ** 2 * scheduler._get_variance(t, t - scheduler.config.num_train_timesteps // args.num_steps)
        closed += ((mean - mean_ref) ** 2).flatten(1).sum(1).double() / (2 * variance)
    diff = got["kl"] - closed.numpy()  # per trajectory: the closed form plus zero-mean noise
    print(f"KL estimate {got['kl'].mean():.2f} nats, closed form {closed.mean():.2f}")
    assert closed.mean() > 1.0
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert np.allclose(got["kl_steps"].sum(), got["kl"].mean(), rtol=1e-4)


def test_compare_prints_and_writes_its_table_figure_and_runs(monkeypatch, tmp_path, capsys):
    rng = np.random.default_rng(0)
    gains = {}

    def fake_run(label, seed, minutes, script_flags, workdir, images_per_prompt, before_cache):
        gain = gains[label, seed] = float(rng.normal(10, 3))
        result = {"label": label, "seed": seed, "epochs": 20, "minutes": minutes, "budget": minutes,
                  "area_before": 12.0, "area_after": 12.0 + gain, "area_gain": (gain, 0.5), "alignment_before": 76.0,
                  "alignment_change": (-gain, 1.0), "kl_before": (0.0, 0.0), "kl": (100 * gain, 5.0),
                  "kl_steps": [10 * gain] * 10, "curve": [[0.0, 1.0, 2.0], [12.0, 15.0, 12.0 + gain]]}
        return result, torch.rand(24, 3, 8, 8), torch.rand(24, 3, 8, 8), [f"prompt {i}" for i in range(24)]

    monkeypatch.setattr(compare, "run", fake_run)
    compare.main(["--settings", "ddpo", "prdp-beta10", "--seeds", "0", "1", "2", "--minutes", "2", "--results",
                  str(tmp_path)])
    out = capsys.readouterr().out
    for label in ("ddpo", "prdp-beta10"):
        g = [gains[label, s] for s in (0, 1, 2)]
        expected = f"{label:<14} area {np.mean(g):+5.1f} +- {np.std(g, ddof=1) / np.sqrt(3):4.2f} (smallest {min(g):+5.1f})"
        assert expected in out
    for name in ("compare.txt", "compare.json", "compare.png", "compare_before.png", "compare_ddpo_after.png",
                 "compare_prdp-beta10_after.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    with open(tmp_path / "compare.json") as f:
        assert [(r["label"], r["seed"]) for r in json.load(f)] == [(l, s) for l in ("ddpo", "prdp-beta10")
                                                                    for s in (0, 1, 2)]
    assert compare.SETTINGS["prdp-beta10"] == ("prdp", ["--beta", "10"])


def test_benchmark_passes_the_flags_after_a_double_dash_to_the_scripts(monkeypatch, tmp_path):
    given = []

    def fake_fine_tune(algorithm, seed, extra_argv, workdir):
        given.append((algorithm, seed, extra_argv))
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(shapes, "fine_tune", fake_fine_tune)
    with pytest.raises(KeyboardInterrupt):
        shapes.main(["--algorithms", "d3po", "--seeds", "3", "--epochs", "5", "--results", str(tmp_path), "--",
                     "--reward", "shapes_alignment", "--learning-rate", "1e-4"])
    assert given == [("d3po", 3, ["--num-epochs", "5", "--reward", "shapes_alignment", "--learning-rate", "1e-4"])]


def test_benchmark_measures_eval_images_of_each_prompt_of_the_runs_prompt_file(monkeypatch, tmp_path, capsys):
    yellow = os.path.join(ROOT, "tutorials", "shapes_yellow.txt")
    measured = []

    def fake_fine_tune(algorithm, seed, extra_argv, workdir):
        argv = ["--model", "toy", "--output-dir", str(tmp_path / "run"), *extra_argv]
        return bookkeeping.parse_args(d3po.Args, argv, presets=d3po.PRESETS), str(tmp_path / "run"), 60.0

    def fake_measure(policy, args, prompts, images_per_prompt):
        measured.append((len(prompts), images_per_prompt))
        n = len(prompts) * images_per_prompt
        scores = {"reward": 0.5, "alignment": 70.0 + len(measured), "per_image_alignment": np.full(n, 0.7),
                  "fully_right": 50.0, "area": 10.0}
        return scores, torch.rand(len(prompts), 3, 8, 8)

    monkeypatch.setattr(shapes, "fine_tune", fake_fine_tune)
    monkeypatch.setattr(shapes, "load_trained", lambda args, run_dir=None: None)
    monkeypatch.setattr(shapes, "measure", fake_measure)
    shapes.main(["--algorithms", "d3po", "--seeds", "0", "--eval-images", "8", "--results", str(tmp_path), "--",
                 "--prompt-file", yellow])
    assert measured == [(6, 8), (6, 8)]  # before and after, eight images of each of the six yellow prompts
    assert "8 images for each of the 6 prompts" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "d3po_after.png")
