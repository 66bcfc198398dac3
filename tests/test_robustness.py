"""What a demanding user's probes found (issue 31): full disks, cut files, interrupted writes, mismatched resumes,
rewards that raise, non-finite images and flags, label scores too large for a float, names Windows reserves, and
D3PO's loss at log-ratios where exp overflows. Each fails on the code before its fix."""
import errno
import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from plumbing import bookkeeping
import common
import d3po
import ddpo
from plumbing import human_feedback
from common import UserError
from conftest import ROOT
from plumbing.rewards import compute_rewards


def test_a_full_disk_while_writing_is_one_sentence_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("old")

    def full(p, error):
        open(p, "w").write("half")
        raise error
    for error in (OSError(errno.ENOSPC, "No space left on device"),
                  RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")):  # torch.save's
        with pytest.raises(UserError, match="could not write .*checkpoint.pt .*is the disk full"):
            bookkeeping.atomic_write(str(path), lambda p: full(p, error))
        assert path.read_text() == "old" and os.listdir(tmp_path) == ["checkpoint.pt"]
    with pytest.raises(UserError, match=r"could not write .*missing/x.json \(No such file or directory\)\.$"):
        bookkeeping.write_json(str(tmp_path / "missing" / "x.json"), {})  # a folder that is not there: one sentence


def test_a_file_size_limit_while_checkpointing_ends_the_run_in_one_sentence(tiny_dir, prompt_file, tmp_path):
    """`ulimit -f`: the tiny model's checkpoint (full fine-tuning) is larger than the limit, its grid and metrics not."""
    out = tmp_path / "run"
    argv = [sys.executable, os.path.join(ROOT, "ddpo.py"), "--model", tiny_dir, "--prompt-file", prompt_file,
            "--output-dir", str(out), "--num-epochs", "1", "--resolution", "32", "--num-steps", "2",
            "--sample-batch-size", "2", "--sample-batches-per-epoch", "1", "--train-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--lora-rank", "0", "--device", "cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "could not write" in done.stderr and "checkpoint.pt" in done.stderr
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and bookkeeping.read_metrics(out)[0]["epoch"] == 0


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    """Two label.py servers on one round: the first writer is still writing when the second has finished."""
    path, started, go, errors = str(tmp_path / "alice.json"), threading.Event(), threading.Event(), []

    def slow(p):
        open(p, "w").write("first")
        started.set()
        go.wait(10)

    def first():
        try:
            bookkeeping.atomic_write(path, slow)
        except BaseException as e:
            errors.append(e)
    thread = threading.Thread(target=first)
    thread.start()
    started.wait(10)
    bookkeeping.atomic_write(path, lambda p: open(p, "w").write("second"))
    go.set()
    thread.join()
    assert not errors and open(path).read() == "first" and os.listdir(tmp_path) == ["alice.json"]


def test_atomic_write_flushes_to_the_disk_before_the_rename(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), replace(a, b)))
    bookkeeping.write_json(str(tmp_path / "x.json"), {"a": 1})
    assert calls == ["fsync", "replace"]


def test_stale_temporaries_are_removed_and_half_swapped_weights_put_back_when_a_run_starts(tiny_dir, tmp_path):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "checkpoint.pt.x1y2.tmp").write_bytes(b"\0" * 100)       # killed while torch.save wrote it
    (out / "samples" / "epoch_0003.png.tmp").write_bytes(b"\0")
    (out / "unet.tmp").mkdir()                                       # killed while save_weights wrote the new one
    (out / "lora.old").mkdir()                                       # killed between its two renames
    (out / "lora.old" / "pytorch_lora_weights.safetensors").write_bytes(b"w")
    args = bookkeeping.parse_args(ddpo.Args, ["--model", tiny_dir, "--output-dir", str(out)])
    bookkeeping.start_output(args, 0)
    assert sorted(os.listdir(out)) == ["config.json", "lora", "metrics.jsonl", "samples"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == b"w" and not os.listdir(out / "samples")


def test_metrics_hold_null_not_nan_and_read_back_as_nan(tmp_path, capsys):
    bookkeeping.append_metrics(str(tmp_path), {"epoch": 0, "loss": float("nan"), "reward_mean": 0.5})
    bookkeeping.append_metrics(str(tmp_path), {"epoch": 1, "loss": float("inf"), "reward_mean": 0.6})
    text = (tmp_path / "metrics.jsonl").read_text()

    def strict(token):
        raise ValueError(token)
    assert [json.loads(line, parse_constant=strict)["loss"] for line in text.splitlines()] == [None, None]
    rows = bookkeeping.read_metrics(str(tmp_path))
    assert math.isnan(rows[0]["loss"]) and rows[1]["reward_mean"] == 0.6


def test_a_cut_last_metrics_line_is_dropped_with_a_word_and_a_bad_middle_one_refused(tmp_path, capsys):
    good = "".join(json.dumps({"epoch": e, "loss": 0.1}) + "\n" for e in range(2))
    (tmp_path / "metrics.jsonl").write_text(good + '{"epoch": 2, "lo')  # as a full disk leaves it
    assert [r["epoch"] for r in bookkeeping.read_metrics(str(tmp_path))] == [0, 1]
    assert "cut short" in capsys.readouterr().out
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "lo\n' + good)
    with pytest.raises(UserError, match="line 1 is not a JSON object"):
        bookkeeping.read_metrics(str(tmp_path))


@pytest.mark.parametrize("flags, named", [(["--lora-rank", "8"], "--lora-rank 4"),
                                          (["--lora-rank", "0"], "--lora-rank 4"),
                                          (["--lora-targets", "cross-attention"], "--lora-targets attention"),
                                          (["--model", "toy"], "--model ")])
def test_resuming_with_another_model_or_adapters_is_refused_before_loading(flags, named, tiny_dir, tmp_path):
    out = tmp_path / "run"
    bookkeeping.write_config(bookkeeping.parse_args(ddpo.Args, ["--model", tiny_dir, "--output-dir", str(out)]))
    with pytest.raises(UserError, match=f"the run was made with {named}"):
        bookkeeping.parse_args(ddpo.Args, ["--resume", str(out), *flags])
    kept = bookkeeping.parse_args(ddpo.Args, ["--resume", str(out), "--lora-rank", "4", "--num-epochs", "9"])
    assert kept.lora_rank == 4 and kept.num_epochs == 9  # the same value, or another flag, is fine


def test_start_from_weights_of_another_architecture_is_refused_at_load(tiny_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                         norm_num_groups=32).save_pretrained(tmp_path / "other" / "unet")
    with pytest.raises(UserError, match="no finished run's weights .* for this model"):
        common.load_pipeline(tiny_dir, "cpu", lora_rank=0, start_from=str(tmp_path / "other"))


def test_a_reward_that_raises_is_named_in_one_sentence_and_its_traceback_kept_in_a_file():
    def wobbly(images, prompts):
        return [1 / 0 for _ in prompts]
    with pytest.raises(UserError, match="the reward wobbly raised ZeroDivisionError: division by zero") as error:
        compute_rewards(wobbly, torch.rand(2, 3, 8, 8), ["a", "b"])
    log = str(error.value).split("traceback is in ")[1].split(")")[0]
    assert "1 / 0" in open(log).read()


def test_non_finite_images_are_stopped_before_scoring_with_their_cause():
    images = torch.rand(2, 3, 8, 8)
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="sampled images of epoch 3 are not finite"):
        compute_rewards(lambda i, p: [0.0, 1.0], images, ["a", "b"], epoch=3)


@pytest.mark.parametrize("flag, value", [("--guidance-scale", "nan"), ("--guidance-scale", "inf"),
                                         ("--guidance-scale", "-5"), ("--resolution", "1048576"),
                                         ("--lora-rank", "100000")])
def test_flags_out_of_their_range_are_refused_before_loading(flag, value, tiny_dir, prompt_file, tmp_path):
    with pytest.raises(UserError, match=f"{flag} must be in"):
        ddpo.main(["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(tmp_path / "x"), flag, value])


def test_label_scores_too_large_for_a_float_and_reserved_names_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="score 1000000000.* is not a number"):
        human_feedback.check_entry({"scores": [1, 10 ** 400]}, "a cat", 2, "prompt 0")
    for name in ("con", "CON", "nul", "Com1", "lpt9", "aux"):
        with pytest.raises(UserError, match="Windows reserves"):
            human_feedback.label_file(str(tmp_path), name)
    assert human_feedback.label_file(str(tmp_path), "Ann") == human_feedback.label_file(str(tmp_path), "ann")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "Bob.json").write_text("[]")  # written before names were folded: still Bob's
    assert human_feedback.label_file(str(tmp_path), "Bob").endswith("Bob.json")


def test_a_prompt_file_with_a_byte_order_mark(tmp_path):
    (tmp_path / "p.txt").write_bytes("\ufeffa cat\na dog\n".encode("utf-8"))
    assert bookkeeping.load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]


def test_d3pos_clamp_gives_the_reference_values_and_finite_gradients_where_exp_overflows():
    log_probs = torch.tensor([[0.02, -0.01], [0.5, -0.3], [100.0, -100.0]], requires_grad=True)
    ref = torch.zeros(3, 2)
    loss, _ = d3po.d3po_loss(log_probs, ref, beta=0.1, ratio_clip=0.1)
    loss.backward()
    assert torch.isfinite(log_probs.grad).all()
    assert log_probs.grad[2].abs().max() == 0 and log_probs.grad[0].abs().min() > 0  # clamped: no gradient
    x = log_probs.detach()[:2].double()  # the reference code's way, where it does not overflow
    w, l_ = torch.log(torch.exp(x).clamp(0.9, 1.1)).unbind(1)
    want = -torch.nn.functional.logsigmoid(0.1 * (w - l_))
    assert float(d3po.d3po_loss(log_probs.detach()[:2], ref[:2], 0.1, 0.1)[0]) == pytest.approx(float(want.mean()))


def test_a_mixs_part_means_cover_every_processs_images_under_torchrun(monkeypatch):
    """Two processes score 3 and 1 of an epoch's 4 images: the logged part means are over all 4, not process 0's."""
    from plumbing import distributed
    from plumbing import rewards
    name = "0.5*jpeg_compressibility+0.5*jpeg_incompressibility"
    mixed = rewards.get_reward_fn(name)
    images = torch.rand(4, 3, 16, 16)
    compute_rewards(mixed, images[:3], ["a"] * 3)                                 # process 0's share
    other = ({k: float(torch.as_tensor(getattr(rewards, k)(images[3:], ["a"]), dtype=torch.float64).mean())
              for k in mixed.last_means}, 1)                                        # process 1's
    monkeypatch.setattr(distributed, "gather_objects", lambda value: [value, other] if isinstance(value, tuple)
                        else [value, {k: [] for k in value}])
    with bookkeeping.Timer() as timer:
        pass
    row = bookkeeping.epoch_metrics(0, torch.zeros(4), {}, timer, timer, name)
    whole = float(torch.as_tensor(rewards.jpeg_compressibility(images, ["a"] * 4), dtype=torch.float64).mean())
    assert row["jpeg_compressibility_mean"] == pytest.approx(whole)


def test_torchrun_with_fewer_batches_a_step_than_processes_says_some_processes_wait(tiny_dir, prompt_file, tmp_path,
                                                                                    monkeypatch, capsys):
    from plumbing import distributed
    monkeypatch.setattr(distributed, "world", lambda: 2)
    argv = ["--model", tiny_dir, "--prompt-file", prompt_file, "--sample-batch-size", "2", "--train-batch-size", "2",
            "--sample-batches-per-epoch", "2", "--device", "cpu"]
    for accumulation, said in (("1", True), ("2", False)):
        args = bookkeeping.parse_args(d3po.Args, [*argv, "--output-dir", str(tmp_path / accumulation),
                                                  "--gradient-accumulation-steps", accumulation])
        bookkeeping.check_args(args, 2)
        bookkeeping.release_output_dir(args)
        assert ("some processes wait" in capsys.readouterr().out) == said


def test_prompts_longer_than_the_text_encoders_window_are_said_once_with_their_count(capsys):
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(common.TOY_MODEL, "tokenizer"))
    long = " ".join(["a small red square"] * 5)  # 20 words: the toy model's encoder reads 16 tokens
    bookkeeping.say_long_prompts(tokenizer, ["a small red square", long, long, "a big blue circle"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "1 of the 3 prompts are longer than the text encoder's 16 tokens" in out
    bookkeeping.say_long_prompts(tokenizer, ["a small red square"])
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/<pid>/maps to know torch is loading")
def test_ctrl_c_while_the_libraries_load_ends_in_one_line(tmp_path):
    """Ctrl-C while torch is still loading (its library mapped, the imports of torch, diffusers and transformers
    still to run): one line on stderr, no traceback, nothing written."""
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "ddpo.py"), "--model", "toy", "--output-dir",
                                str(tmp_path / "run"), "--num-epochs", "1"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               # Ctrl-C as a terminal sends it, even where this test runs with SIGINT ignored (a
                               # background job's children inherit that, and Python then installs no handler)
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        with open(f"/proc/{process.pid}/maps") as f:
            if "libtorch" in f.read():
                break
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted"
    assert process.returncode != 0 and not (tmp_path / "run").exists()


def test_sigterm_ends_a_run_as_ctrl_c_does_and_keeps_its_finished_epochs(tmp_path):
    """`kill`, `timeout` and a cluster's scheduler stop a run with SIGTERM: the same one line as Ctrl-C (no traceback,
    exit status 130), no temporary file left, the finished epochs kept; and run_main puts SIGTERM's handler back."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "ddpo.py"), "--model", "flow-toy", "--output-dir",
                                str(out), "--num-epochs", "3"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first epoch finished: the run is in its second
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted: " + bookkeeping.RESUMABLE
    assert not [f for _, _, files in os.walk(out) for f in files if f.endswith(".tmp")]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] in (0, 1)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        bookkeeping.run_main(lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert signal.getsignal(signal.SIGTERM) is handler
    ran = []  # from another thread, where Python allows no handler to be set, run_main still runs
    thread = threading.Thread(target=bookkeeping.run_main, args=(lambda: ran.append(True),))
    thread.start()
    thread.join()
    assert ran == [True]


def test_weights_interrupted_while_written_leave_the_old_ones_and_no_half_new_directory(tiny_dir, tmp_path,
                                                                                       monkeypatch):
    """Ctrl-C (or a benchmark's time budget) during save_weights: the previous unet/ is whole and unet.tmp is gone at
    once, not left for the next run's clean-up (a budgeted benchmark run once left one)."""
    from plumbing import bookkeeping
    pipe, _, _ = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=0)
    bookkeeping.save_weights(pipe, str(tmp_path))
    before = sorted(os.listdir(tmp_path / "unet"))
    write = pipe.unet.save_pretrained

    def interrupted(path, **kwargs):
        write(path, **kwargs)  # the new directory written in full, then the interruption
        raise KeyboardInterrupt
    monkeypatch.setattr(pipe.unet, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bookkeeping.save_weights(pipe, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["unet"] and sorted(os.listdir(tmp_path / "unet")) == before
