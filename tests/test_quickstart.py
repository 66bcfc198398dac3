"""The README's quick start, run exactly as written, and a fast check that it learns: the shape-area objective
rises on evaluation noise held apart from training (the full figures come from benchmarks/shapes.py)."""
import os
import re
import shlex
import subprocess
import sys

import pytest

import bookkeeping
import shapes
from conftest import ROOT

pytestmark = pytest.mark.slow


def quickstart_command():
    """The one `python ddpo.py --model toy ...` line of README.md's quick start."""
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = [line.strip() for line in f if re.match(r"\s*python ddpo\.py --model toy", line)]
    assert len(lines) == 1, "README.md must give exactly one quick-start command"
    return shlex.split(lines[0])


def test_readme_quickstart_runs_and_raises_the_objective(tmp_path):
    command = quickstart_command()
    result = subprocess.run([sys.executable, os.path.join(ROOT, command[1]), *command[2:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=1200, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: metrics in runs/quickstart/metrics.jsonl" in result.stdout
    assert "torchvision" not in result.stderr  # transformers' harmless note that it reads images with PIL
    run_dir = str(tmp_path / "runs" / "quickstart")
    args = bookkeeping.parse_args(__import__("ddpo").Args, ["--resume", run_dir])
    prompts = bookkeeping.load_prompts(args.prompt_file)
    before, _ = shapes.measure(shapes.load_trained(args), args, prompts, images_per_prompt=8)
    after, _ = shapes.measure(shapes.load_trained(args, run_dir), args, prompts, images_per_prompt=8)
    print(f"shape area on held-apart noise: {before['area']:.1f}% -> {after['area']:.1f}%")
    assert after["area"] > before["area"] + 1.5  # the benchmark's 40-epoch runs gain 11 to 16 points
