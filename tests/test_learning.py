"""A fast check that D3PO and PRDP learn on the shipped toy model: a short run with the toy preset raises the
preset's objective (the shape's area) on evaluation noise held apart from training. The full figures, beside
DDPO's, come from benchmarks/shapes.py."""
import os
import sys

import pytest

import common
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import shapes  # noqa: E402

EPOCHS = {"d3po": 12, "prdp": 10}


@pytest.mark.parametrize("algorithm", EPOCHS)
def test_short_toy_run_raises_the_objective(algorithm, tmp_path):
    args, run_dir, seconds = shapes.fine_tune(algorithm, 0, ["--num-epochs", str(EPOCHS[algorithm])], str(tmp_path))
    prompts = common.load_prompts(args.prompt_file)
    before, _ = shapes.measure(*shapes.load_trained(args), args, prompts)
    after, _ = shapes.measure(*shapes.load_trained(args, run_dir), args, prompts)
    print(f"{algorithm}: shape area on held-apart noise {before['area']:.1f}% -> {after['area']:.1f}% "
          f"in {seconds / 60:.1f} min")
    assert args.reward == "shape_area"
    assert after["area"] > before["area"] + 1.5


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
