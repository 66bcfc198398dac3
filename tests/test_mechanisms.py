"""The toy presets let each paper's own mechanism act, not only its loss: DDPO takes several optimiser steps on an
epoch's samples, so its importance ratio pi_theta / pi_old leaves 1 and its clip catches some steps; PRDP takes
K >= 2 proximal steps an epoch, so some steps' log-ratios move further than eps from theta_old's and are clipped.
With one optimiser step an epoch (the presets until 2026-12-06) the ratio is exactly 1 while an epoch trains and
both clips log 0. One epoch of each preset, as the README's quick start runs it."""
import importlib

import pytest

from plumbing import bookkeeping


@pytest.mark.parametrize("script", ["ddpo", "prdp"])
def test_the_toy_preset_takes_several_steps_an_epoch_and_its_clip_acts(script, tmp_path):
    module = importlib.import_module(script)
    argv = ["--model", "toy", "--num-epochs", "1", "--output-dir", str(tmp_path / "run"), "--device", "cpu"]
    args = bookkeeping.parse_args(module.Args, argv, presets=module.PRESETS)
    images = args.sample_batch_size * args.sample_batches_per_epoch
    if script == "ddpo":
        steps = args.inner_epochs * images // (args.train_batch_size * args.gradient_accumulation_steps)
    else:
        steps = args.grad_steps_per_epoch
    assert steps >= 2, "one optimiser step an epoch: the ratio to theta_old stays 1 and the clip cannot act"
    module.main(argv)
    row = bookkeeping.read_metrics(tmp_path / "run")[0]
    assert row["clipfrac"] > 0  # some steps of the epoch's later optimiser steps were clipped
    if script == "ddpo":
        assert row["approx_kl"] > 0  # 0.5 mean (log pi_theta - log pi_old)^2: the ratio left 1
