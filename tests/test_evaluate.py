"""evaluate.py: a run scored against its base model. Its numbers against the toy benchmark's own measurement (which
loads the run's checkpoint.pt, not its unet/), its KL against log-probs recomputed under a separately loaded base
model, its diversity and paired errors against the obvious loops, and the command on a tiny LoRA run with tiny reward
models."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from plumbing import bookkeeping
import common
import ddpo
from plumbing import evaluate
import shapes
from common import UserError
from conftest import ROOT
from test_ddpo_e2e import tiny_args


def test_diversity_is_each_prompts_mean_rms_difference_over_every_pair_of_its_images():
    torch.manual_seed(0)
    images, n = torch.rand(3 * 4, 3, 8, 8), 4
    loop = [np.mean([float((images[p * n + i] - images[p * n + j]).pow(2).mean().sqrt())
                     for i, j in itertools.combinations(range(n), 2)]) for p in range(3)]
    assert evaluate.diversity(images, n) == pytest.approx(100 * np.array(loop), rel=1e-5)
    assert (evaluate.diversity(torch.rand(3, 3, 8, 8).repeat_interleave(n, 0), n) == 0).all()  # copies: none


def test_compare_gives_the_paired_standard_error_of_the_change():
    before, after = [1.0, 2.0, 3.0, 5.0], [2.0, 4.0, 3.0, 6.0]
    got = evaluate.compare(before, after)
    diffs = [1.0, 2.0, 0.0, 1.0]
    mean = sum(diffs) / 4
    se = (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5 / 2
    assert got["change"] == pytest.approx(1.0) and got["change_se"] == pytest.approx(se)
    assert got["before"] == pytest.approx(2.75) and got["after_se"] == pytest.approx(np.std(after, ddof=1) / 2)


def test_on_the_toy_model_it_gives_the_benchmarks_numbers(tmp_path):
    """A toy run (full fine-tuning, one epoch): evaluate.py, which loads unet/ into the base pipeline, against
    benchmarks/shapes.py's measure, which loads checkpoint.pt, image for image on the same noise."""
    run = str(tmp_path / "run")
    argv = ["--model", "toy", "--output-dir", run, "--num-epochs", "1", "--sample-batch-size", "8",
            "--sample-batches-per-epoch", "1", "--train-batch-size", "8", "--gradient-accumulation-steps", "1",
            "--inner-epochs", "1", "--learning-rate", "1e-3", "--per-prompt-min-count", "1", "--device", "cpu"]
    ddpo.main(argv)
    args = bookkeeping.parse_args(ddpo.Args, argv, presets=ddpo.PRESETS)
    prompts = bookkeeping.load_prompts(args.prompt_file)[:3]
    result, _, _ = evaluate.evaluate_run(run, prompts, ["shape_area", "shapes_alignment"], 4, "cpu")
    before = shapes.measure(shapes.load_trained(args), args, prompts, 4)[0]
    after = shapes.measure(shapes.load_trained(args, run, reference=True), args, prompts, 4, kl=True)[0]
    area, alignment = result["metrics"]["shape_area"], result["metrics"]["shapes_alignment"]
    assert 100 * area["before"] == pytest.approx(before["area"], rel=1e-6)
    assert 100 * area["after"] == pytest.approx(after["area"], rel=1e-6)
    assert 100 * alignment["after"] == pytest.approx(after["alignment"], rel=1e-6)
    assert area["after"] != area["before"]  # the run changed the model: the comparison is not of one model twice
    assert result["kl"]["mean"] == pytest.approx(float(after["kl"].mean()), rel=1e-4, abs=1e-3)
    assert result["metrics"]["diversity"]["after"] == pytest.approx(
        float(evaluate.diversity(after["images"], 4).mean()), rel=1e-6)


@pytest.fixture(scope="module")
def lora_run(tiny_dir, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "run"
    ddpo.main(tiny_args(tiny_dir, prompt_file, out))
    return str(out)


def test_kl_is_the_log_ratio_under_a_separately_loaded_base_model(lora_run, tiny_dir, prompt_file):
    """The KL evaluate.py reports, against sum_t log pi_theta - log pi_ref recomputed with two pipelines loaded
    apart: the base (no LoRA) and the run's (its LoRA fused in as --start-from loads it)."""
    prompts = bookkeeping.load_prompts(prompt_file)
    result, _, after_grid = evaluate.evaluate_run(lora_run, prompts, ["jpeg_compressibility"], 2, "cpu")
    args = bookkeeping.parse_args(ddpo.Args, ["--resume", lora_run])

    def policy(start_from=None):
        pipe, _, autocast = common.load_pipeline(tiny_dir, "cpu", lora_rank=0, resolution=32, start_from=start_from)
        return common.Policy(pipe, common.encode_prompts(pipe, [""]), args.num_steps, args.guidance_scale, args.eta,
                             autocast)
    trained, base = policy(lora_run), policy()
    samples, _ = evaluate.held_apart_samples(trained, args, prompts, 2)
    assert torch.allclose(samples.images[::2], after_grid, atol=1e-5)  # the trajectories evaluate.py drew
    base.pipe.scheduler.set_timesteps(args.num_steps)  # (sampling sets it; this pipeline has not sampled)
    with torch.no_grad():
        ref = torch.stack([common.log_prob(base, samples, torch.arange(len(samples.images)), s)
                           for s in range(len(samples.timesteps))], 1)
    kl = ((samples.log_probs - ref).double() * samples.latents[0, 0].numel()).sum(1).mean()
    assert result["kl"]["mean"] == pytest.approx(float(kl), rel=1e-3)
    assert result["kl"]["mean"] > 1e-3  # the LoRA moved the model


def test_the_command_prints_a_panel_and_writes_json_and_a_grid(lora_run, tmp_path):
    reward_models = __import__("tiny_pipeline").make_tiny_reward_models(str(tmp_path / "rewards"))
    output = tmp_path / "new" / "eval.json"  # its folder is made, as a script's --output-dir is
    done = subprocess.run([sys.executable, "-m", "plumbing.evaluate", lora_run, "--rewards", "aesthetic",
                           "clip_score", "jpeg_compressibility", "--images-per-prompt", "2", "--output", str(output),
                           "--device", "cpu"], capture_output=True, text=True, env={**os.environ, **reward_models},
                          cwd=ROOT)  # the command as the README gives it, from the repository's folder
    assert done.returncode == 0, done.stderr
    saved = json.loads(output.read_text())
    assert set(saved["metrics"]) == {"aesthetic", "clip_score", "jpeg_compressibility", "diversity"}
    assert saved["prompts"] == 3 and saved["images_per_prompt"] == 2 and saved["kl"]["mean"] > 0
    for name in saved["metrics"]:
        assert name in done.stdout
    assert "KL to the base" in done.stdout and (tmp_path / "new" / "eval.png").is_file()


def test_bad_input_is_one_sentence(lora_run, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not a run directory"):
        evaluate.main([str(tmp_path)])
    with pytest.raises(UserError, match="unknown reward"):
        evaluate.main([lora_run, "--rewards", "beauty"])
    os.makedirs(tmp_path / "half")
    with open(tmp_path / "half" / "config.json", "w") as f:
        json.dump(json.load(open(os.path.join(lora_run, "config.json"))), f)  # a run that never finished an epoch
    with pytest.raises(UserError, match="no finished run's weights"):
        evaluate.main([str(tmp_path / "half")])
    with open(tmp_path / "half" / "config.json", "w") as f:
        json.dump(json.load(open(os.path.join(lora_run, "config.json"))) | {"sample_only": True}, f)
    with pytest.raises(UserError, match=r"is a round of images to label \(d3po.py --sample-only\), not a trained"):
        evaluate.main([str(tmp_path / "half")])
    monkeypatch.setattr(evaluate, "evaluate_run", None)  # a bad --output is refused before any sampling
    (tmp_path / "file").write_text("")
    for output in (tmp_path / "file" / "eval.json", tmp_path / "file" / "deeper" / "eval.json"):
        with pytest.raises(UserError, match=r"--output's folder .* cannot be created \(a file is in its path\)\.$"):
            evaluate.main([lora_run, "--output", str(output)])
    with pytest.raises(UserError, match="is a folder: give the JSON file's path"):
        evaluate.main([lora_run, "--output", str(tmp_path)])
