"""Several processes with torchrun (distributed.py): two CPU processes (gloo) train what one process trains on the
same flags, write nothing twice, and hand a run on to any number of processes."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from plumbing import bookkeeping
import d3po
import ddpo
from plumbing import distributed
import prdp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = {  # each: two optimiser steps an epoch, each of two training batches (one a process under torchrun)
    ddpo: ["--sample-batch-size", "2", "--sample-batches-per-epoch", "4", "--train-batch-size", "2",
           "--clip-range", "0.2"],
    d3po: ["--sample-batch-size", "4", "--sample-batches-per-epoch", "2", "--train-batch-size", "2"],
    prdp: ["--sample-batch-size", "4", "--sample-batches-per-epoch", "2", "--train-batch-size", "2",
           "--images-per-prompt", "2", "--grad-steps-per-epoch", "2", "--clip-eps", "1e-3"]}


def run_args(module, tiny_dir, prompt_file, out, epochs=1):
    return ["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(out), "--num-epochs", str(epochs),
            "--resolution", "32", "--num-steps", "3", "--gradient-accumulation-steps", "2", "--learning-rate", "1e-2",
            "--lora-rank", "4", "--device", "cpu", "--seed", "5", *FLAGS[module]]


def torchrun(module, argv, processes=2):
    """`torchrun --nproc-per-node 2 <script> argv` on this machine's CPU; returns its output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(processes), os.path.join(ROOT, f"{module.__name__}.py"), *argv],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def lora_weights(out):
    return load_file(os.path.join(out, "lora", "pytorch_lora_weights.safetensors"))


def assert_same_weights(a, b, lr=1e-2):
    """The processes sum a step's gradient in another order than one process accumulates it, and Adam's steps,
    about lr x g / |g|, carry that float rounding into the weights, much more for a few elements whose gradient
    nearly cancels: every element within a quarter of one step, and on average within a thousandth of one."""
    assert a.keys() == b.keys()
    assert max(float(v.abs().max()) for k, v in a.items() if "up" in k or "lora_B" in k) > lr / 10  # trained
    diffs = torch.cat([(a[name] - b[name]).abs().flatten() for name in a])
    assert diffs.max() < lr / 4 and diffs.mean() < lr / 1000, (float(diffs.max()), float(diffs.mean()))


@pytest.mark.slow  # torchrun starts two processes that each load the pipeline: 20 s a script
@pytest.mark.parametrize("module", [ddpo, d3po, prdp], ids=lambda m: m.__name__)
def test_two_processes_train_the_weights_one_process_trains(module, tiny_dir, prompt_file, tmp_path):
    """Every optimiser step sums the two processes' gradients (a step whose weights differ between the processes
    stops the run: distributed.check_in_step), and after an epoch the weights are the one-process run's; the
    two-process DDPO run then resumes on one process to the one-process run's second epoch."""
    module.main(run_args(module, tiny_dir, prompt_file, tmp_path / "one"))
    output = torchrun(module, run_args(module, tiny_dir, prompt_file, tmp_path / "two"))
    one, two = bookkeeping.read_metrics(tmp_path / "one"), bookkeeping.read_metrics(tmp_path / "two")
    # the gradient before clipping and Adam, whose normalisation would hide a gradient halved or doubled
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4) and one[0]["grad_norm"] > 0
    assert_same_weights(lora_weights(tmp_path / "two"), lora_weights(tmp_path / "one"))
    assert len(two) == 1 and two[0]["reward_mean"] == pytest.approx(one[0]["reward_mean"], rel=1e-5)
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-3)              # every process's batches logged
    assert output.count("done: metrics in") == 1                                   # process 0 alone reports
    if module is ddpo:  # one script is enough: resuming is the same code in the three (bookkeeping)
        for run in ("one", "two"):
            ddpo.main(["--resume", str(tmp_path / run), "--num-epochs", "2"])
        assert [r["epoch"] for r in bookkeeping.read_metrics(tmp_path / "two")] == [0, 1]
        assert_same_weights(lora_weights(tmp_path / "two"), lora_weights(tmp_path / "one"))


@pytest.mark.slow  # torchrun: two processes that each load the tiny SD3 pipeline, 8-16 s
@pytest.mark.parametrize("module", [prdp], ids=lambda m: m.__name__)  # sampling, reference log-probs and groups
def test_a_flow_model_trains_on_two_processes_what_one_process_trains(module, tiny_sd3_dir, prompt_file, tmp_path):
    """The same on an SD3 pipeline, the flow step's policy: its pooled prompt embeddings go with each batch, and its
    step's noise is drawn for every batch in every process, so that each random stream stays the one-process run's.
    (The three scripts passed it on 2026-12-07; one is kept for CI's time, the one that uses most of the shared code.)"""
    module.main(run_args(module, tiny_sd3_dir, prompt_file, tmp_path / "one"))
    torchrun(module, run_args(module, tiny_sd3_dir, prompt_file, tmp_path / "two"))
    one, two = bookkeeping.read_metrics(tmp_path / "one"), bookkeeping.read_metrics(tmp_path / "two")
    assert two[0]["reward_mean"] == pytest.approx(one[0]["reward_mean"], rel=1e-5)
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-3) and one[0]["grad_norm"] > 0
    assert_same_weights(lora_weights(tmp_path / "two"), lora_weights(tmp_path / "one"))


def test_a_process_other_than_the_first_writes_nothing(tiny_dir, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "gather_objects", lambda value: [value, value])
    args = bookkeeping.parse_args(ddpo.Args, run_args(ddpo, tiny_dir, prompt_file, tmp_path / "out"))
    ddpo.check_args(args)                                   # no hold on the directory, no config
    bookkeeping.start_output(args, 0)
    bookkeeping.end_epoch(None, None, None, args, 0, {"epoch": 0}, torch.rand(2, 3, 8, 8), ["a", "b"], None, {})
    bookkeeping.finish(args)
    assert os.listdir(tmp_path / "out") == []


def test_the_epochs_sampling_batches_must_be_shared_evenly(monkeypatch, tiny_dir, prompt_file, tmp_path):
    monkeypatch.setattr(distributed, "world", lambda: 4)
    args = bookkeeping.parse_args(ddpo.Args, run_args(ddpo, tiny_dir, prompt_file, tmp_path / "out") +
                                  ["--sample-batches-per-epoch", "2", "--gradient-accumulation-steps", "1"])
    with pytest.raises(bookkeeping.UserError, match="must be a multiple of the 4 processes"):
        ddpo.check_args(args)


def alive(pid):
    """Whether a process runs (a zombie, exited and not yet reaped by its parent, does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # torchrun, an epoch, and the timeout
def test_a_stuck_process_ends_the_run_in_bounded_time_with_the_last_checkpoint_whole(tiny_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    argv = run_args(ddpo, tiny_dir, prompt_file, out, epochs=1000) + ["--process-timeout", "5"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            os.path.join(ROOT, "ddpo.py"), *argv], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True)
    stuck = None
    try:
        start = time.monotonic()
        while not (out / "checkpoint.pt").is_file():
            assert time.monotonic() - start < 300 and run.poll() is None, "no epoch finished"
            time.sleep(0.5)
        children = [int(c) for t in os.listdir(f"/proc/{run.pid}/task")
                    for c in open(f"/proc/{run.pid}/task/{t}/children").read().split()]
        rank = {r: next(c for c in children if f"\0RANK={r}\0".encode() in b"\0" + open(f"/proc/{c}/environ",
                                                                                         "rb").read()) for r in (0, 1)}
        stuck = rank[1]
        os.kill(stuck, signal.SIGSTOP)  # as a debugger, a full swap or a hung driver would
        stopped = time.monotonic()
        # the run ends when process 0, the one that writes, gives up on the stuck one; torchrun itself then waits
        # 30 s more for the stopped process to answer SIGTERM before it kills it (its own, fixed, teardown)
        while alive(rank[0]) and time.monotonic() - stopped < 120:
            time.sleep(0.2)
        waited = time.monotonic() - stopped
    finally:
        for pid, kill, sig in ((stuck, os.kill, signal.SIGCONT), (run.pid, os.killpg, signal.SIGKILL)):
            with contextlib.suppress(ProcessLookupError, TypeError):  # gone already (or never found)
                kill(pid, sig)
    assert not alive(rank[0]) and waited < 5 + 60, waited  # not gloo's 30 minutes
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] >= 0 and not [f for f in os.listdir(out) if f.endswith(".tmp")]
