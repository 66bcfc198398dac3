"""The README's quick starts (three on the DDIM toy, three on the flow toy), run exactly as written, and a check
that each learns: the shape-area objective rises on evaluation noise held apart from training by at least 5 points
and by more than twice the standard error of its change (the README gives the figures of seeds 0, 1 and 2).

CI runs the flow toy's three (20-60 s each on one core). The DDIM toy's three take 2 to 3.5 minutes each on one core,
eight minutes of the two workers' time together, so they run only with --long
(`python -m pytest -q -n 2 tests/test_quickstart.py --long`: the file in 7.5 minutes on two cores); in CI their presets'
mechanisms are checked on one epoch each instead (test_the_ddim_toy_presets_clips_act_in_their_first_epoch), and
D3PO's learning on that toy by the exercises' capstone."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from plumbing import bookkeeping
import shapes
from conftest import ROOT

pytestmark = pytest.mark.slow
SCRIPTS = ("ddpo", "d3po", "prdp")
CASES = [(script, model) for model in ("toy", "flow-toy") for script in SCRIPTS]  # the DDIM toy, the flow toy
LONG = pytest.mark.long  # the DDIM toy's: only with --long (tests/conftest.py)
IMAGES = 4  # a prompt, on held-apart noise; as the exercises' capstone measures


def quickstart_commands():
    """The `python X.py --model toy ...` and `--model flow-toy` lines of the README's quick-start section, by
    (script, model)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines()
             if re.match(r"python \w+\.py --model (flow-)?toy ", line.strip())]
    commands = {(shlex.split(line)[1][:-3], shlex.split(line)[3]): shlex.split(line.split("#")[0]) for line in lines}
    assert sorted(commands) == sorted(CASES) and len(lines) == 6, "one quick-start command for each script and model"
    return commands


BEFORE = {}  # the untrained model's measurement: the three presets sample alike, so it is measured once


@pytest.mark.parametrize("script, model", [pytest.param(*case, marks=LONG if case[1] == "toy" else ())
                                           for case in CASES])
def test_readme_quickstart_runs_and_raises_the_objective(script, model, tmp_path):
    command = quickstart_commands()[script, model]
    result = subprocess.run([sys.executable, os.path.join(ROOT, command[1]), *command[2:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=1200, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = command[command.index("--output-dir") + 1]
    assert f"done: metrics in {run_dir}/metrics.jsonl" in result.stdout
    assert "torchvision" not in result.stderr  # transformers' harmless note that it reads images with PIL
    with open(tmp_path / run_dir / "metrics.jsonl") as f:
        rewards = [json.loads(line)["reward_mean"] for line in f]
    args = bookkeeping.parse_args(__import__(script).Args, ["--resume", str(tmp_path / run_dir)])
    prompts = bookkeeping.load_prompts(args.prompt_file)
    key = (args.model, args.num_steps, args.guidance_scale, args.eta, args.resolution, tuple(prompts))
    if key not in BEFORE:
        BEFORE[key] = shapes.measure(shapes.load_trained(args), args, prompts, IMAGES)[0]
    before = BEFORE[key]
    after, _ = shapes.measure(shapes.load_trained(args, str(tmp_path / run_dir)), args, prompts, IMAGES)
    change, se = after["area"] - before["area"], shapes.paired_se(before, after, "area")
    print(f"{script}: shape area on held-apart noise {before['area']:.1f}% -> {after['area']:.1f}% ({change:+.1f}, "
          f"s.e. {se:.2f}); the epochs' samples {100 * rewards[0]:.1f}% -> {100 * rewards[-1]:.1f}%")
    assert args.reward == "shape_area" and len(rewards) == args.num_epochs
    assert change >= 5 and change > 2 * se  # at least 5 points of area, the README's promise for each quick start
    assert sum(rewards[-3:]) > sum(rewards[:3])  # and the line an epoch prints shows it rising
    if script in ("ddpo", "prdp"):
        mechanisms_act(script, args, tmp_path / run_dir)


@pytest.mark.parametrize("script", ["ddpo", "prdp"])
def test_the_ddim_toy_presets_clips_act_in_their_first_epoch(script, tmp_path):
    """The DDIM toy's quick starts run only with --long: here one epoch of each preset, in this process."""
    module = __import__(script)
    argv = ["--model", "toy", "--num-epochs", "1", "--output-dir", str(tmp_path / "run")]
    module.main(argv)
    mechanisms_act(script, bookkeeping.parse_args(module.Args, argv, presets=module.PRESETS), tmp_path / "run")


def mechanisms_act(script, args, run_dir):
    """The toy presets let each paper's own mechanism act, not only its loss: DDPO takes several optimiser steps on
    an epoch's samples, so its importance ratio pi_theta / pi_old leaves 1 and its clip catches some steps; PRDP takes
    K >= 2 proximal steps an epoch, so some steps' log-ratios move further than eps from theta_old's and are clipped.
    With one optimiser step an epoch (the presets until 2026-12-06) the ratio is exactly 1 while an epoch trains and
    both clips log 0. Checked on the first epoch (seed 0) of the flow toy's quick starts and of the DDIM toy's presets
    (the flow toy's commands clip tighter: its steps' log-probs move less per update, and with the DDIM toy's clips
    nothing was caught)."""
    images = args.sample_batch_size * args.sample_batches_per_epoch
    if script == "ddpo":
        steps = args.inner_epochs * images // (args.train_batch_size * args.gradient_accumulation_steps)
    else:
        steps = args.grad_steps_per_epoch
    assert steps >= 2, "one optimiser step an epoch: the ratio to theta_old stays 1 and the clip cannot act"
    first = bookkeeping.read_metrics(run_dir)[0]
    assert first["clipfrac"] > 0  # some steps of the epoch's later optimiser steps were clipped
    if script == "ddpo":
        assert first["approx_kl"] > 0  # 0.5 mean (log pi_theta - log pi_old)^2: the ratio left 1
