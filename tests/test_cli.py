"""The command line: bad input gets one sentence and no traceback; --help documents every flag."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from plumbing import bookkeeping
import d3po
import ddpo
import prdp
from conftest import ROOT

SCRIPTS = ["ddpo.py", "d3po.py", "prdp.py"]


def run(script, *args, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def bad_inputs(tiny_dir, prompt_file, tmp_path, module=ddpo):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    (tmp_path / "a_file").write_text("in the way")
    (tmp_path / "broken_reward.py").write_text("def reward(images, prompts:\n")
    (tmp_path / "odd_rewards.py").write_text("def words(images, prompts):\n    return ['good'] * len(prompts)\n"
                                             "def nan(images, prompts):\n    return [float('nan')] * len(prompts)\n")
    base = ["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(tmp_path / "out"),
            "--resolution", "32", "--num-steps", "2", "--device", "cpu"]
    # one small sampling batch, for the cases that load the model and sample before they fail
    small = base + ["--sample-batch-size", "4", "--sample-batches-per-epoch", "1", "--train-batch-size", "4",
                    "--gradient-accumulation-steps", "1"] + (["--images-per-prompt", "2"] if module is prdp else [])
    cut_short = {}
    for name, damage, data in (("checkpoint", "checkpoint.pt", b"PK\x03"), ("empty", "checkpoint.pt", b""),
                               ("config", "config.json", b'{"model": "'), ("list", "config.json", b"[1, 2]")):
        run = tmp_path / f"cut-{name}"
        bookkeeping.write_config(bookkeeping.parse_args(module.Args, base + ["--output-dir", str(run)]))
        (run / damage).write_bytes(data)
        cut_short[name] = str(run)
    return {
        "binary prompt file": (base + ["--prompt-file", str(tmp_path / "binary.txt")], "is not UTF-8 text"),
        "prompt file that is a directory": (base + ["--prompt-file", str(tmp_path)], "is a directory"),
        "prompt file that is a device": (base + ["--prompt-file", "/dev/null"], "is not a regular file"),
        "prompt file that cannot be read": (base + ["--prompt-file", "/proc/self/mem"], "cannot be read (Input/output"),
        "output dir behind a file": (base + ["--output-dir", str(tmp_path / "a_file" / "run")],
                                     "cannot be created (a file is in its path)"),
        "output dir under /proc": (base + ["--output-dir", "/proc/no/run"], "cannot be created"),
        "output dir that cannot be written": (base + ["--output-dir", "/proc"], "cannot be written"),
        "empty output dir": (base + ["--output-dir", ""], "--output-dir is empty"),
        "device nonsense": (base + ["--device", "toaster"], "is not a torch device"),
        "more steps than the scheduler has": (base + ["--num-steps", "1001"], "--num-steps must be in [1, 1000]"),
        "negative learning rate": (base + ["--learning-rate=-1e-4"], "--learning-rate must be in (0, inf)"),
        "NaN learning rate": (base + ["--learning-rate", "nan"], "--learning-rate must be in (0, inf)"),
        "negative seed": (base + ["--seed=-1"], "--seed must be in [0, 9e12]"),
        "seed too large": (base + ["--seed", str(10 ** 13)], "--seed must be in [0, 9e12]"),
        "gradient clip 0": (base + ["--max-grad-norm", "0"], "--max-grad-norm must be in (0, inf)"),
        "reward module with a syntax error": (base + ["--reward", "broken_reward:reward"], "could not import reward"),
        "reward without a module": (base + ["--reward", ":reward"], "could not import reward"),
        "reward returning words": (small + ["--reward", "odd_rewards:words"], "returned something that is not numbers"),
        "reward returning NaN": (small + ["--reward", "odd_rewards:nan"], "non-finite values (NaN or infinite) for 4 "
                                                                          "images in epoch 0"),
        "resume from a cut-short checkpoint": (["--resume", cut_short["checkpoint"]], "checkpoint.pt cannot be read"),
        "resume from an empty checkpoint": (["--resume", cut_short["empty"]], "checkpoint.pt cannot be read"),
        "resume from a cut-short config": (["--resume", cut_short["config"]], "config.json is not readable JSON"),
        "resume from a config that is no dict": (["--resume", cut_short["list"]], "config.json holds no run's settings"),
        "output dir with a config that is no dict": (base + ["--output-dir", cut_short["list"]],
                                                     "config.json holds no run's settings"),
        **({} if torch.cuda.is_available() else {"cuda without a GPU": (base + ["--device", "cuda"], "no CUDA GPU")}),
        "missing prompt file": (base + ["--prompt-file", str(tmp_path / "nope.txt")], "does not exist"),
        "empty prompt file": (base + ["--prompt-file", str(empty)], "has no prompts"),
        "unknown reward": (base + ["--reward", "beauty"], "unknown reward 'beauty'; known rewards are"),
        "bad reward mix": (base + ["--reward", "0.7*aesthetic+0.3"], "'0.3' is not weight*reward"),
        "mix of an unknown reward": (base + ["--reward", "0.5*beauty+0.5*aesthetic"], "unknown reward 'beauty'"),
        "eta zero": (base + ["--eta", "0"], "--eta must be in (0, 1]"),
        "train batch does not divide": (base + ["--sample-batch-size", "6", "--train-batch-size", "4"],
                                        "must divide --sample-batch-size"),
        "missing model dir": (base + ["--model", str(tmp_path / "no-model")], "does not exist"),
        "dir that is not a pipeline": (base + ["--model", str(tmp_path)], "could not load a Stable Diffusion pipeline"),
        "unreachable hub id": (base + ["--model", "someone/not-cached-model"], "local diffusers directory"),
        "resume of a non-run": (["--resume", str(tmp_path)], "not a run directory"),
    }


@pytest.mark.parametrize("script, module", [("ddpo.py", ddpo), ("d3po.py", d3po), ("prdp.py", prdp)])
def test_bad_input_is_one_sentence_without_traceback(script, module, tiny_dir, prompt_file, tmp_path, capsys):
    """Each case through the scripts' own entry point, bookkeeping.run_main, in this process; and one of them as a
    command, to see what a user sees."""
    sys.path.insert(0, str(tmp_path))  # where the broken reward module is
    for case, (args, message) in bad_inputs(tiny_dir, prompt_file, tmp_path, module).items():
        with pytest.raises(SystemExit) as exit_status:
            bookkeeping.run_main(lambda: module.main(args))
        assert exit_status.value.code == 2, case
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, (case, last)
        assert not os.path.exists(tmp_path / "out" / "checkpoint.pt"), case  # stopped before any work
    sys.path.remove(str(tmp_path))
    args, message = bad_inputs(tiny_dir, prompt_file, tmp_path)["eta zero"]
    result = run(script, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"] and message in result.stderr


# flags whose default is a choice of this project rather than a hyperparameter with a source
NO_SOURCE = {"output_dir", "seed", "device", "resume", "mixed_precision", "labels", "start_from",
             "gradient_checkpointing", "tensorboard", "process_timeout"}
SOURCE = re.compile(r"reference|paper|DDPO|D3PO|PRDP|Table|Sec\.|SD v1")


@pytest.mark.parametrize("module", [ddpo, d3po, prdp], ids=lambda m: m.__name__)
def test_help_documents_every_flag_with_default_and_source(module, capsys):
    """Through the script's main, in this process (as a command it only adds 5 s of imports)."""
    with pytest.raises(SystemExit) as status:
        module.main(["--help"])
    assert status.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index("options:"):]  # past the usage line and the description
    fields = dataclasses.fields(module.Args)
    assert text.count("(default:") == len(fields)
    for field in fields:
        flag = "--" + field.name.replace("_", "-")
        # the help entry of this flag: from "--flag X" up to its "(default: ...)"
        entry = re.search(re.escape(flag) + r"(?:, --no-\S+)?[ =]\S.*?\(default: ([^)]*)\)", text)
        assert entry, flag
        assert entry.group(1).replace(" ", "") == str(field.default).replace(" ", ""), flag  # argparse wraps at "-"
        if field.name not in NO_SOURCE:
            assert SOURCE.search(entry.group(0)), f"{flag} does not say where its default comes from"


def test_toy_preset_replaces_defaults_but_not_given_flags():
    args = bookkeeping.parse_args(ddpo.Args, ["--model", "toy", "--learning-rate", "5e-4"], presets=ddpo.PRESETS)
    assert args.learning_rate == 5e-4                                   # given: kept
    assert args.num_steps == ddpo.PRESETS["toy"]["num_steps"] != ddpo.Args.num_steps  # not given: preset
    assert args.reward == "shape_area" and args.lora_rank == 0
    plain = bookkeeping.parse_args(ddpo.Args, ["--model", "some/model"], presets=ddpo.PRESETS)
    assert plain.num_steps == ddpo.Args.num_steps and plain.learning_rate == ddpo.Args.learning_rate


def test_abbreviated_flags_are_refused_rather_than_overridden_by_a_preset():
    """argparse would read --learning as --learning-rate, but the preset would not see it as given."""
    with pytest.raises(SystemExit):
        bookkeeping.parse_args(ddpo.Args, ["--model", "toy", "--learning", "5e-4"], presets=ddpo.PRESETS)
    args = bookkeeping.parse_args(ddpo.Args, ["--model", "toy", "--learning-rate=5e-4"], presets=ddpo.PRESETS)
    assert args.learning_rate == 5e-4


def test_a_bool_flag_turned_off_on_the_command_line_wins_over_a_preset_that_turns_it_on():
    presets = {"toy": {"shared_noise": True}}
    assert bookkeeping.parse_args(prdp.Args, ["--model", "toy"], presets=presets).shared_noise
    assert not bookkeeping.parse_args(prdp.Args, ["--model", "toy", "--no-shared-noise"], presets=presets).shared_noise
    assert bookkeeping.parse_args(prdp.Args, ["--model", "x", "--shared-noise"], presets=presets).shared_noise


@pytest.mark.parametrize("module, flag, value, interval", [
    (ddpo, "--timestep-fraction", "0", "(0, 1]"), (ddpo, "--inner-epochs", "0", "[1, inf)"),
    (d3po, "--ratio-clip", "1.0", "(0, 1)"), (d3po, "--beta", "0", "(0, inf)"),
    (prdp, "--images-per-prompt", "1", "[2, inf)"), (prdp, "--clip-eps", "-1e-3", "(0, inf)")])
def test_the_algorithms_own_flags_are_checked_against_their_interval(module, flag, value, interval, tmp_path):
    args = bookkeeping.parse_args(module.Args, ["--model", "toy", f"{flag}={value}", "--output-dir", str(tmp_path)],
                                  presets=module.PRESETS)
    with pytest.raises(bookkeeping.UserError, match=re.escape(f"{flag} must be in {interval} (got ")):
        module.check_args(args)
    ok = bookkeeping.parse_args(module.Args, ["--model", "toy", "--output-dir", str(tmp_path)], presets=module.PRESETS)
    module.check_args(ok)


@pytest.mark.parametrize("device, precision, said", [("cpu", "fp16", True), ("cpu", "bf16", False),
                                                     ("cpu", "auto", False), ("meta", "fp16", False)])
def test_fp16_on_the_cpu_is_said_to_be_slow(device, precision, said, tmp_path, capsys):
    """Full fine-tuning's float16 convolution gradients are 50 times float32's on the CPU: a run copied from a GPU's
    command line is told so, once, before any model is loaded (meta: a device that is not the CPU, without a GPU)."""
    args = bookkeeping.parse_args(ddpo.Args, ["--model", "toy", "--device", device, "--mixed-precision", precision,
                                              "--output-dir", str(tmp_path)], presets=ddpo.PRESETS)
    ddpo.check_args(args)
    assert ("note: --mixed-precision fp16 is slow on the CPU" in capsys.readouterr().out) == said


def test_ctrl_c_says_how_to_go_on_without_a_traceback(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as status:
        bookkeeping.run_main(interrupted)
    assert status.value.code == 130
    assert capsys.readouterr().err.strip() == ("interrupted: the run keeps every epoch it finished; continue it with "
                                               "--resume <its --output-dir>")


def snapshot(directory):
    """Every file under a directory, with its bytes."""
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(directory) for f in files}


def test_a_directory_that_another_script_or_kind_of_run_wrote_is_refused_and_left_as_it_was(tiny_dir, prompt_file,
                                                                                              tmp_path, capsys):
    """A finished ddpo.py run and a d3po.py round (config.json says which script wrote them, and whether it is a
    round); every other script, and every other kind of run, is refused before any model loads."""
    base = ["--model", tiny_dir, "--prompt-file", prompt_file, "--resolution", "32", "--num-steps", "2",
            "--device", "cpu", "--sample-batch-size", "4", "--sample-batches-per-epoch", "1", "--train-batch-size",
            "4", "--gradient-accumulation-steps", "1"]
    run, round_ = str(tmp_path / "ddpo-run"), str(tmp_path / "round")
    ddpo.main(base + ["--output-dir", run, "--num-epochs", "1"])
    d3po.main(base + ["--output-dir", round_, "--sample-only", "--images-per-prompt", "2"])
    assert [json.load(open(os.path.join(d, "config.json")))["script"] for d in (run, round_)] == ["ddpo.py", "d3po.py"]
    assert [json.load(open(os.path.join(d, "config.json")))["round"] for d in (run, round_)] == [False, True]
    cases = [
        (d3po, ["--resume", run], f"{run!r} holds a ddpo.py training run, which d3po.py must not write into; "
                                  f"continue it with ddpo.py --resume."),
        (prdp, base + ["--output-dir", run, "--images-per-prompt", "2"],
         "holds a ddpo.py training run, which prdp.py must not write into; choose another --output-dir."),
        (d3po, base + ["--output-dir", run, "--sample-only"],
         "holds a ddpo.py training run, which d3po.py --sample-only must not write into"),
        (ddpo, base + ["--output-dir", run], f"{run!r} already holds a run; continue it with --resume {run}"),
        (ddpo, base + ["--output-dir", round_], f"{round_!r} holds a d3po.py round of human feedback (--sample-only), "
                                                f"which ddpo.py must not write into"),
        (d3po, base + ["--output-dir", round_], "round of human feedback (--sample-only), which d3po.py must not"),
        (prdp, ["--resume", round_], "round of human feedback (--sample-only), which prdp.py must not write into"),
    ]
    before = {d: snapshot(d) for d in (run, round_)}
    capsys.readouterr()
    for module, argv, message in cases:
        with pytest.raises(SystemExit) as status:
            bookkeeping.run_main(lambda: module.main(argv))
        assert status.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, (argv, err)
    assert {d: snapshot(d) for d in (run, round_)} == before


def test_a_directory_in_use_is_refused_until_its_process_ends_even_by_kill_9(tiny_dir, prompt_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", out, "--num-epochs", "1",
            "--resolution", "32", "--num-steps", "2", "--device", "cpu", "--sample-batch-size", "4",
            "--sample-batches-per-epoch", "1", "--train-batch-size", "4", "--gradient-accumulation-steps", "1"]
    holder = subprocess.Popen(  # a run that has passed its checks (and so holds the directory), then waits
        [sys.executable, "-c", "import sys, time, ddpo\nfrom plumbing import bookkeeping\n"
         "ddpo.check_args(bookkeeping.parse_args(ddpo.Args, sys.argv[1:]))\nprint('held', flush=True)\ntime.sleep(300)",
         *argv], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as status:
            bookkeeping.run_main(lambda: ddpo.main(argv))
        assert status.value.code == 2
        assert capsys.readouterr().err.strip() == (f"error: {out!r} is in use by another run (process {holder.pid}); "
                                                   f"wait for it to end or choose another --output-dir.")
        assert not os.path.exists(os.path.join(out, "config.json"))  # the second run wrote nothing
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    ddpo.main(argv)  # the killed run's hold is gone with its process
    assert [r["epoch"] for r in bookkeeping.read_metrics(out)] == [0]
