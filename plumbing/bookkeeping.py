"""Run bookkeeping shared by ddpo.py, d3po.py and prdp.py, which a reader of the algorithms can skip: the command
line, argument checks, prompt files, the output directory (config, metrics, image grids, curves), checkpoints and
resuming, and the weights saved for diffusers. Every file is written atomically, so an interrupted run loses at
most the epoch it was in.
"""
import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time

try:
    import fcntl  # the run-directory lock (Linux, macOS); Windows has no flock and runs without it
except ImportError:
    fcntl = None
import numpy as np
import torch
from PIL import Image, ImageDraw

from plumbing import distributed
from common import UserError
from plumbing.rewards import MIXES, to_uint8

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


RESUMABLE = "the run keeps every epoch it finished; continue it with --resume <its --output-dir>"


def run_main(main, interrupted=RESUMABLE):
    """Call `main()`, turning a UserError into one line on stderr and exit status 2, and Ctrl-C or SIGTERM (`kill`,
    `timeout`, a cluster's scheduler) into one line, `interrupted`, that says how to go on (exit status 130)."""
    # transformers says on every run that it reads images with PIL because torchvision is not installed: harmless
    quiet = logging.getLogger("transformers.utils.import_utils")
    quiet.addFilter(lambda record: "requires torchvision" not in record.getMessage())
    # SIGTERM raises KeyboardInterrupt, as Ctrl-C does: a file being written is cleaned up, not left half-way (only
    # the main thread may set a handler; a run started from another thread keeps the process's)
    main_thread = threading.current_thread() is threading.main_thread()
    terminate = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        sys.exit(130)
    finally:
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)


def quiet_libraries():
    """diffusers' and transformers' own progress bars and warnings off: the terminal is for the project's bars and
    metrics. Done when bookkeeping is imported, as every script and tutorial does."""
    import diffusers
    import transformers
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


quiet_libraries()


def load_prompts(path):
    """Prompts from a text file: one a line; blank lines and lines starting with '#' are skipped."""
    if not os.path.isfile(path) and os.path.isfile(os.path.join(PROJECT, path)):
        path = os.path.join(PROJECT, path)  # the project's own prompt files work from any directory
    if os.path.isdir(path):
        raise UserError(f"prompt file {path!r} is a directory; give a text file with one prompt a line.")
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path!r} " + ("is not a regular file." if os.path.exists(path) else
                                                    "does not exist."))
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first prompt
            prompts = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path!r} is not UTF-8 text; give a text file with one prompt a line.")
    except OSError as e:  # unreadable: permissions, a vanished network file
        raise UserError(f"prompt file {path!r} cannot be read ({e.strerror or e}).")
    if not prompts:
        raise UserError(f"prompt file {path!r} has no prompts (one a line; '#' starts a comment).")
    return prompts


def say_long_prompts(tokenizer, prompts):
    """Stable Diffusion's text encoder reads the first 77 tokens of a prompt and drops the rest: said once a run,
    with the count, where a prompt is longer."""
    prompts, limit = sorted(set(prompts)), tokenizer.model_max_length
    long = [p for p, ids in zip(prompts, tokenizer(prompts).input_ids) if len(ids) > limit]
    if long and distributed.is_main():
        print(f"note: {len(long)} of the {len(prompts)} prompts are longer than the text encoder's {limit} tokens "
              f"(its start and end included) and are cut to them, as Stable Diffusion does; the first: "
              f"{long[0][:80]!r}...", flush=True)


# ---- The command line: a dataclass of arguments, each with its help text and the source of its default -------------

def arg(default, help, choices=None, within=None):
    """A dataclass field that becomes a command-line flag with this help text; `within` is the interval its value
    must lie in, written as in mathematics: "(0, 1]", "[1, inf)"."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "within": within})


def parse_args(args_class, argv=None, description=None, presets=None):
    """Build --kebab-case flags from a dataclass, parse argv, and apply presets and --resume.

    presets maps a --model value to defaults that replace the dataclass's for that model (flags given on the
    command line still win). With --resume DIR the run's saved config.json is loaded, and only flags given
    on this command line (for example a larger --num-epochs) override it; the run goes on writing into DIR.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    epilog = "\n".join(f"--model {name} changes these defaults: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in preset.items()) for name, preset in (presets or {}).items())
    # allow_abbrev=False: presets and --resume must see which flags were given, by their full names
    parser = argparse.ArgumentParser(description=description, epilog=epilog, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    flags = {}
    for f in dataclasses.fields(args_class):
        flag = "--" + f.name.replace("_", "-")
        flags[f.name] = flag
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=f.type if f.type in (int, float) else str, default=f.default,
                                choices=f.metadata["choices"], help=help_text, metavar=None)
    ns = vars(parser.parse_args(argv))
    given = {name for name, flag in flags.items()  # a bool flag is also given as --no-<name>
             if any(a in (flag, "--no-" + flag[2:]) or a.startswith(flag + "=") for a in argv)}
    if ns.get("labels") and "model" not in given:  # d3po.py --labels: a round trains with its model's preset
        ns["model"] = (read_config(ns["labels"], "--labels") or {}).get("model", ns["model"])
    if not ns.get("resume") and ns["model"] in (presets or {}):
        ns.update({k: v for k, v in presets[ns["model"]].items() if k not in given})
    if ns.get("resume"):
        saved = read_config(ns["resume"], "--resume")
        if saved is None:
            raise UserError(f"--resume {ns['resume']!r}: no config.json there, so it is not a run directory.")
        changed = [k for k in ("model", "lora_rank", "lora_targets") if k in given and k in saved and ns[k] != saved[k]]
        if changed:  # the checkpoint's weights are of the saved model and adapters: they would not load
            raise UserError(f"--resume {ns['resume']!r}: the run was made with " + ", ".join(
                f"{flags[k]} {saved[k]}" for k in changed) + "; a resumed run keeps its model and adapters (drop "
                f"{'those flags' if len(changed) > 1 else 'the flag'}, or start a new run in another --output-dir).")
        ns.update({k: v for k, v in saved.items() if k in flags and k not in given and k != "resume"})
        ns["output_dir"] = ns["resume"]
    ns["device"] = distributed.setup(ns["device"], ns["gradient_checkpointing"],  # torchrun: this process's GPU
                                     ns.get("process_timeout", 600.0))
    return args_class(**ns)


def read_config(directory, flag):
    """The config.json of a run directory as a dict, or None where there is none; `flag` names it in errors."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{flag} {directory!r}: its config.json is not readable JSON (cut short?).")
    if not isinstance(config, dict):
        raise UserError(f"{flag} {directory!r}: its config.json holds no run's settings (edited by hand?).")
    return config


# the intervals of shared flags (an algorithm's own flags give theirs in Args): a learning rate or clip of 0 would
# freeze the model without a word; Stable Diffusion's schedulers have 1000 training timesteps to step through
SHARED_WITHIN = {"learning_rate": "(0, inf)", "max_grad_norm": "(0, inf)", "weight_decay": "[0, inf)",
                 "guidance_scale": "[0, inf)", "resolution": "[8, 4096]", "lora_rank": "[0, 1024]",
                 "num_steps": "[1, 1000]", "seed": "[0, 9e12]"}


def check_args(args, group=1, part_of_group=False):
    """Checks shared by the three scripts, made before any model is loaded: every flag within its interval, and
    the batch sizes consistent, in whole groups of `group` images that are compared (D3PO's pairs, PRDP's prompts);
    part_of_group: a training batch may also divide a group, whose optimiser steps are still whole groups."""
    if not 0 < args.eta <= 1:
        raise UserError(f"--eta must be in (0, 1] (got {args.eta}): with eta = 0 DDIM is deterministic and "
                        f"log-probs are undefined, and above 1 the step's variance exceeds what DDIM allows.")
    for name in ("num_epochs", "num_steps", "sample_batch_size", "sample_batches_per_epoch", "train_batch_size",
                 "gradient_accumulation_steps", "resolution"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    if args.lora_rank < 0:
        raise UserError(f"--lora-rank must be 0 (full fine-tuning) or more (got {args.lora_rank}).")
    for f in dataclasses.fields(args):
        within, value = f.metadata.get("within") or SHARED_WITHIN.get(f.name), getattr(args, f.name)
        if within:
            low, high = (float(x) for x in within[1:-1].split(","))
            if not ((low < value or within[0] == "[" and low == value) and
                    (value < high or within[-1] == "]" and value == high)):
                raise UserError(f"--{f.name.replace('_', '-')} must be in {within} (got {value}).")
    if args.sample_batch_size % args.train_batch_size:
        raise UserError(f"--train-batch-size {args.train_batch_size} must divide --sample-batch-size "
                        f"{args.sample_batch_size}.")
    tbs, step = args.train_batch_size, args.train_batch_size * args.gradient_accumulation_steps
    if part_of_group and tbs < group and (group % tbs or step % group):
        raise UserError(f"--train-batch-size {tbs}, below the {group} images compared together, must divide them, and "
                        f"an optimiser step (x --gradient-accumulation-steps) must be whole groups of them.")
    epoch = args.sample_batch_size * args.sample_batches_per_epoch
    if tbs % group and not (part_of_group and tbs < group) or epoch % group:
        raise UserError(f"--train-batch-size {args.train_batch_size}, and the images of an epoch, must be whole groups "
                        f"of the {group} images that are compared.")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard.")
    if args.sample_batches_per_epoch % distributed.world():
        raise UserError(f"--sample-batches-per-epoch {args.sample_batches_per_epoch} must be a multiple of the "
                        f"{distributed.world()} processes, which share the epoch's sampling batches.")
    if args.gradient_accumulation_steps % distributed.world() and distributed.is_main():
        print(f"note: an optimiser step's {args.gradient_accumulation_steps} training batches are shared among "
              f"{distributed.world()} processes, so some processes wait in some steps; a --gradient-accumulation-"
              f"steps that is a multiple of {distributed.world()} (with a smaller --train-batch-size for the same "
              f"step) keeps every process training", flush=True)
    train_batches = args.sample_batch_size * args.sample_batches_per_epoch // args.train_batch_size
    if train_batches % args.gradient_accumulation_steps:
        raise UserError(f"the {train_batches} training batches per epoch cannot be split into optimiser steps of "
                        f"--gradient-accumulation-steps {args.gradient_accumulation_steps}.")
    if args.resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8 (got {args.resolution}).")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...).")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: this machine has no CUDA GPU that torch can use; try --device cpu.")
    if device.type == "cpu" and args.mixed_precision == "fp16" and distributed.is_main():
        print("note: --mixed-precision fp16 is slow on the CPU: PyTorch's float16 convolution gradients there made a "
              "training pass of the toy model 50 times slower than float32 (twice with LoRA); no (the CPU's default) "
              "or bf16 is faster", flush=True)
    if not args.output_dir:
        raise UserError("--output-dir is empty; give the directory the run writes to.")
    make_folder(args.output_dir, "--output-dir")  # before any model is loaded
    if distributed.is_main():  # under torchrun, process 0 alone writes
        claim_output_dir(args)


# ---- The output directory: who writes it, config, metrics, image grids, curves ------------------------------------

HELD = {}  # the output directories this process holds: real path -> its open .lock file


def owner(args):
    """What writes into args.output_dir: the script, and whether it is a round of D3PO's human feedback."""
    module = sys.modules[type(args).__module__]
    return {"script": os.path.basename(getattr(module, "__file__", None) or module.__name__),
            "round": bool(getattr(args, "sample_only", False))}


def claim_output_dir(args):
    """Hold the output directory for this process, and refuse one that another script or kind of run wrote.

    The hold is an flock on <output_dir>/.lock, which the system lets go of when the process ends in any way
    (kill -9 too), so a second run into a directory in use is refused and a killed run leaves nothing stuck."""
    path = os.path.realpath(args.output_dir)
    if fcntl and path not in HELD:
        try:
            lock = open(os.path.join(path, ".lock"), "a+")
        except OSError as e:
            raise UserError(f"--output-dir {args.output_dir!r} cannot be written ({e.strerror}).")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise UserError(f"{args.output_dir!r} is in use by another run (process {lock.read().strip() or '?'}); "
                            f"wait for it to end or choose another --output-dir.")
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        HELD[path] = lock
    saved, mine = read_config(args.output_dir, "--output-dir"), owner(args)
    # (a config.json written before configs named their script is taken as this script's)
    theirs = mine if saved is None else {"script": saved.get("script", mine["script"]),
                                         "round": saved.get("round", saved.get("sample_only", False))}
    if theirs != mine:
        kind = "round of human feedback (--sample-only)" if theirs["round"] else "training run"
        go_on = f"continue it with {theirs['script']} --resume" if args.resume else "choose another --output-dir"
        raise UserError(f"{args.output_dir!r} holds a {theirs['script']} {kind}, which "
                        f"{mine['script']}{' --sample-only' * mine['round']} must not write into; {go_on}.")
    if not args.resume and os.path.isfile(os.path.join(args.output_dir, "checkpoint.pt")):
        raise UserError(f"{args.output_dir!r} already holds a run; continue it with --resume {args.output_dir} "
                        f"or choose another --output-dir.")


def release_output_dir(args):
    lock = HELD.pop(os.path.realpath(args.output_dir), None)
    if lock:
        lock.close()


def make_folder(path, flag):
    """Make the folder a command will write to, before its work: a file in the way, or a place that cannot be
    written, is one sentence now instead of a traceback at the end."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        reason = "a file is in its path" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise UserError(f"{flag} {path!r} cannot be created ({reason}).")


def atomic_write(path, write):
    """Write a file through `write(tmp_path)`, flush it to the disk and rename it into place, so an interruption
    leaves the old one. The temporary's name is this writer's own (two writers of one file never share it); a failed
    write removes it, and a full disk or a file-size limit says so in one sentence (the old file is kept)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    except OSError as e:  # its folder is missing, or not writable
        raise UserError(f"could not write {path} ({e.strerror}).") from e
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)  # as open() would have made it (mkstemp's is 0o600)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, UserError):  # torch.save's RuntimeError too
            reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise UserError(f"could not write {path} ({reason}; is the disk full?): the previous one, if any, is "
                            f"kept, and the run stops.") from e
        raise


def remove_stale_temporaries(output_dir):
    """What an interrupted write left (a kill skips atomic_write's cleanup): temporaries are removed; a weights
    directory caught between its two renames (save_weights) is put back."""
    for folder in (output_dir, os.path.join(output_dir, "samples"), os.path.join(output_dir, "labels")):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            path = os.path.join(folder, name)
            if name.endswith(".tmp") and os.path.isfile(path):
                os.remove(path)
    for weights in ("lora", "unet"):
        final = os.path.join(output_dir, weights)
        shutil.rmtree(final + ".tmp", ignore_errors=True)
        if os.path.isdir(final + ".old"):
            if os.path.isdir(final):
                shutil.rmtree(final + ".old", ignore_errors=True)
            else:
                os.replace(final + ".old", final)


UMASK = os.umask(0o022)  # the process's file-creation mask, read once (reading it means setting it), then restored
os.umask(UMASK)


def write_json(path, value):
    atomic_write(path, lambda p: open(p, "w").write(json.dumps(value, indent=1) + "\n"))


def write_config(args):
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "config.json"), dataclasses.asdict(args) | owner(args))


def epoch_metrics(epoch, rewards, info, sample_timer, train_timer, reward=""):
    """One epoch's metrics: the reward's mean and std over the epoch's samples, before training on them (rewards:
    (n,), or (n, k) for k comma-separated rewards, the first of which is the reward_mean, or None), the mean of
    each quantity logged in `info` (NaN where nothing was trained; under torchrun, every process's values), and
    the seconds of each phase."""
    info = {k: [float(x) for x in v] for k, v in info.items()}  # read now: the GPU has finished the epoch's work
    info = {k: sum((each[k] for each in distributed.gather_objects(info)), []) for k in info}
    row = {"epoch": epoch}
    if rewards is not None:
        rewards = torch.as_tensor(rewards, dtype=torch.float64).cpu().reshape(len(rewards), -1)  # (B, k)
        row.update(reward_mean=float(rewards[:, 0].mean()), reward_std=float(rewards[:, 0].std(correction=0)))
        if rewards.shape[1] > 1:
            row.update({f"{name}_mean": float(m) for name, m in zip(reward.split(","), rewards.mean(0))})
        for name in [n for n in reward.split(",") if n in MIXES]:  # a mix: each part's mean over the epoch's images
            shares = distributed.gather_objects((MIXES[name].last_means, MIXES[name].last_count))  # torchrun: all
            total = sum(count for _, count in shares)
            row.update({f"{part}_mean": sum(means[part] * count for means, count in shares) / total
                        for part in MIXES[name].last_means if total})
    row.update({k: float(np.mean(v)) if v else float("nan") for k, v in info.items()})
    row.update(sample_seconds=sample_timer.seconds, train_seconds=train_timer.seconds,
               seconds=sample_timer.seconds + train_timer.seconds)
    return row


def log_info(info, **values):
    """Append each value (a number, or a one-element tensor left where it is) to the list of its name in `info`.
    A tensor is read at the epoch's end (epoch_metrics), not here: reading a CUDA tensor waits for the GPU, and
    once a training call would leave the GPU idle while Python prepares the next call."""
    for key, value in values.items():
        info.setdefault(key, []).append(value.detach() if torch.is_tensor(value) else value)


def append_metrics(output_dir, row):
    """One JSON object per epoch in metrics.jsonl (NaN and infinities as null, which strict JSON readers accept),
    the file rewritten atomically, so that a full disk never leaves a cut line; also printed as one line."""
    write_metrics(output_dir, read_metrics(output_dir) + [row])
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def write_metrics(output_dir, rows):
    atomic_write(os.path.join(output_dir, "metrics.jsonl"), lambda p: open(p, "w").write("".join(
        json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}) + "\n"
        for r in rows)))


def read_metrics(output_dir):
    """The rows of metrics.jsonl, null read back as NaN. A cut last line (a disk that filled while an older version
    appended it) is dropped with a word; any other unreadable line is refused in one sentence."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for n, line in enumerate(lines):
        try:
            rows.append({k: float("nan") if v is None else v for k, v in json.loads(line).items()})
        except (json.JSONDecodeError, AttributeError):
            if n < len(lines) - 1:
                raise UserError(f"{path}: line {n + 1} is not a JSON object (edited by hand?); remove it to go on.")
            print(f"{path}: its last line was cut short (a full disk?) and is dropped", flush=True)
    return rows


def save_grid(images, captions, path, columns=8, scale=1):
    """Save images (B, 3, H, W) in [0, 1] as one PNG grid, each with its caption beneath on up to two lines, cut
    only beyond them (and each image enlarged `scale` times, pixel for pixel, for small models)."""
    arrays = to_uint8(images).repeat(scale, axis=1).repeat(scale, axis=2)
    n, (h, w) = len(arrays), arrays.shape[1:3]
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    cell_w, text_h = max(w, 96), 24
    width = cell_w // 6  # characters a line, in PIL's default font
    grid = Image.new("RGB", (columns * cell_w, rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (arr, caption) in enumerate(zip(arrays, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * (h + text_h)
        grid.paste(Image.fromarray(arr), (x + (cell_w - w) // 2, y))
        lines = textwrap.wrap(caption, width)
        lines = lines[:1] + [" ".join(lines[1:])[:width]] if len(lines) > 1 else lines
        draw.text((x + 2, y + h), "\n".join(lines), fill="black", spacing=0)
    atomic_write(path, lambda p: grid.save(p, format="PNG"))


CURVE_SKIP = ("epoch", "reward_std", "sample_seconds", "train_seconds")


def plot_curves(rows, columns=3):
    """A matplotlib figure of each numeric metric of metrics.jsonl rows against the epoch, one panel each:
    reward_mean first, with a band of +- reward_std; each panel's title gives the first and last value. A metric
    that never changed in a run of several epochs (a clip that never acted, a fixed count) gets no panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in rows[0] if k not in CURVE_SKIP and isinstance(rows[0][k], (int, float))]
    keys = [k for k in keys if len(rows) < 2 or len({json.dumps(r.get(k)) for r in rows}) > 1]  # flat: not drawn
    keys.sort(key=lambda k: k != "reward_mean")
    figure, axes = plt.subplots(math.ceil(len(keys) / columns), columns, squeeze=False,
                                figsize=(3.2 * columns, 2.2 * math.ceil(len(keys) / columns)), layout="constrained")
    for ax, key in zip(axes.flat, keys):
        points = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        epochs, values = [e for e, _ in points], [v for _, v in points]
        if key == "reward_mean" and all("reward_std" in r for r in rows):
            std = [r["reward_std"] for r in rows if math.isfinite(r[key])]
            ax.fill_between(epochs, np.subtract(values, std), np.add(values, std), alpha=0.25, linewidth=0)
        ax.plot(epochs, values, marker="." if len(points) < 30 else None)
        ax.set_title(f"{key}: {values[0]:.3g} -> {values[-1]:.3g}" if values else key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    return figure


def save_curves(rows, path):
    import matplotlib.pyplot as plt
    figure = plot_curves(rows)
    atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=80))
    plt.close(figure)


CURVES_EVERY = 30.0  # seconds: a plot takes about a second, a toy model's epoch a few
CURVES_DRAWN = {}    # output directory -> (time.monotonic(), metrics rows) of its last curves.png, or of its start


def draw_curves(output_dir, final=False):
    """Redraw curves.png from metrics.jsonl every CURVES_EVERY seconds from the run's start (start_output), and at
    its end (final) if an epoch came since: a run shorter than that draws once."""
    rows = read_metrics(output_dir)
    last, drawn = CURVES_DRAWN.get(output_dir, (-math.inf, 0))
    if rows and len(rows) != drawn and (final or time.monotonic() - last >= CURVES_EVERY):
        save_curves(rows, os.path.join(output_dir, "curves.png"))
        CURVES_DRAWN[output_dir] = time.monotonic(), len(rows)


# ---- Checkpoints, resuming, and the weights diffusers loads ----------------------------------------------------------

def save_checkpoint(pipe, optimizer, scaler, epoch, extra, output_dir):
    """Everything needed to continue after `epoch`, then the LoRA (or UNet) for diffusers; both atomically."""
    model = {name: p.detach().cpu().clone() for name, p in pipe.unet.named_parameters() if p.requires_grad}
    state = {"epoch": epoch, "model": model, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "extra": extra}
    atomic_write(os.path.join(output_dir, "checkpoint.pt"), lambda p: torch.save(state, p))
    save_weights(pipe, output_dir)


def load_checkpoint(pipe, optimizer, scaler, output_dir):
    """Restore a checkpoint written by save_checkpoint, on whatever device this run uses; returns (next_epoch, extra).

    A run saved without fp16 gradient scaling (on the CPU, or in fp32 or bf16) and resumed with it (fp16 on CUDA)
    starts the scaler afresh, as a new run would; the other way round the saved scale is not needed."""
    path = os.path.join(output_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"--resume {output_dir!r}: no checkpoint.pt there (the run stopped before its first epoch "
                        f"ended).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or empty file raises EOFError, RuntimeError or an unpickling error
        raise UserError(f"--resume {output_dir!r}: checkpoint.pt cannot be read ({type(e).__name__}; cut short?).")
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"] or not scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    else:
        print("resuming with fp16 gradient scaling, which the saved run did not use: the scaler starts afresh",
              flush=True)
    return state["epoch"] + 1, state["extra"]


def save_weights(pipe, output_dir):
    """Save what was trained where diffusers loads it: <output_dir>/lora for LoRA, <output_dir>/unet otherwise.

    The new directory is written beside the old one and swapped in, so an interruption never leaves neither.
    """
    lora = any("lora" in n for n, p in pipe.unet.named_parameters() if p.requires_grad)
    final = os.path.join(output_dir, "lora" if lora else "unet")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict
            layers = get_peft_model_state_dict(pipe.unet)
            if hasattr(pipe, "transformer"):  # SD3 loads peft's names as they are (converted, half are lost)
                type(pipe).save_lora_weights(tmp, transformer_lora_layers=layers, safe_serialization=True)
            else:
                type(pipe).save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(layers),
                                             safe_serialization=True)
        else:
            pipe.unet.save_pretrained(tmp, safe_serialization=True)
    except BaseException:  # Ctrl-C, or a budget's alarm, while writing: the old directory stays, the half-new goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def epoch_generator(seed, epoch):
    """A CPU generator seeded by (seed, epoch): every epoch's randomness is reproducible, so resuming at epoch
    k gives the same run as not stopping."""
    return torch.Generator("cpu").manual_seed(seed * 1_000_003 + epoch)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def start_output(args, start_epoch):
    """Create the output directory and config.json; on resume drop metrics of epochs that will be redone. (Whether
    the directory may be written was settled by check_args, before any model was loaded.)"""
    if not distributed.is_main():
        return
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    remove_stale_temporaries(args.output_dir)
    CURVES_DRAWN[args.output_dir] = time.monotonic(), 0
    write_config(args)
    write_metrics(args.output_dir, [r for r in read_metrics(args.output_dir) if r["epoch"] < start_epoch])
    print(f"writing to {args.output_dir}", flush=True)


def end_epoch(pipe, optimizer, scaler, args, epoch, metrics, images, prompts, rewards, extra, grid_size=16):
    """Image grid, a metrics line, the curves so far (at most every CURVES_EVERY seconds), then the checkpoint: an
    interruption at any point loses at most this epoch. (Process 0's work under torchrun.)"""
    if not distributed.is_main():
        return
    captions = list(prompts)
    if rewards is not None:  # captioned with the (first) reward
        first = torch.as_tensor(rewards).reshape(len(prompts), -1)[:, 0].tolist()
        captions = [f"{r:.3g} {p}" for p, r in zip(prompts, first)]
    save_grid(images[:grid_size], captions[:grid_size],
              os.path.join(args.output_dir, "samples", f"epoch_{epoch:04d}.png"))
    append_metrics(args.output_dir, metrics)
    if args.tensorboard:
        tensorboard_log(args.output_dir, metrics)
    draw_curves(args.output_dir)
    save_checkpoint(pipe, optimizer, scaler, epoch, extra, args.output_dir)


TENSORBOARD = {}  # output directory -> its open TensorBoard writer


def tensorboard_log(output_dir, row):
    """The epoch's numbers as TensorBoard scalars (step = epoch), in <output_dir>/tensorboard, flushed at once so that
    a long run can be watched live (`tensorboard --logdir <output_dir>`)."""
    from torch.utils.tensorboard import SummaryWriter
    if output_dir not in TENSORBOARD:
        TENSORBOARD[output_dir] = SummaryWriter(os.path.join(output_dir, "tensorboard"))
    writer = TENSORBOARD[output_dir]
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()


def finish(args):
    main = distributed.is_main()
    if args.output_dir in TENSORBOARD:
        TENSORBOARD.pop(args.output_dir).close()
    distributed.finish()
    if not main:
        return
    draw_curves(args.output_dir, final=True)
    release_output_dir(args)
    print(f"done: metrics in {args.output_dir}/metrics.jsonl, image grids in {args.output_dir}/samples/, "
          f"weights in {args.output_dir}/{'lora' if args.lora_rank > 0 else 'unet'}", flush=True)

