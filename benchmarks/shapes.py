"""Fine-tune the shipped toy model (--model toy) and measure what changed, on noise held apart from training.

    python benchmarks/shapes.py                          # ddpo, d3po and prdp, seeds 0 1, their toy presets
                                                         # (about 5 minutes a run, half an hour in all)
    python benchmarks/shapes.py --algorithms d3po --seeds 0 --epochs 10    # shorter
    python benchmarks/shapes.py --algorithms d3po --seeds 0 --results /tmp/r -- --reward shapes_alignment
                                                         # flags after -- go to the training script
    python benchmarks/shapes.py --algorithms prdp --seeds 0 1 2 3 --epochs 30 --eval-images 64 --results /tmp/y \
        -- --reward shapes_correct --lora-rank 8 --lora-targets cross-attention --learning-rate 3e-3 --beta 16 \
        --train-batch-size 16 --gradient-accumulation-steps 4 --prompt-file tutorials/shapes_yellow.txt
                                                         # alignment on the six yellow prompts (docs/shapes_world.md)

For each algorithm and seed it prints the prompt alignment of the model before and after fine-tuning
(mean soft score x 100, with the standard error of its change, and the share of images right in colour, shape
and size), the shape-area objective, and the wall time of the fine-tuning run; it saves before/after grids
(one image per prompt) under benchmarks/results/. The evaluation samples every prompt of the run's prompt file
(tutorials/shapes.txt by default) --eval-images times (16) from EVAL_SEED, a seed no training run uses (training draws
from seed * 1_000_003 + epoch).
"""
import argparse
import importlib
import os
import signal
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from plumbing import bookkeeping  # noqa: E402
from toy_model.measure import EVAL_IMAGES_PER_PROMPT, EVAL_SEED, load_trained, measure, paired_se  # noqa: E402,F401


class OutOfTime(BaseException):
    """Raised by the alarm that ends a run's wall-clock budget (a BaseException, as KeyboardInterrupt, so that no
    `except Exception` on the way turns it into something else)."""


def fine_tune(algorithm, seed, extra_argv, workdir, minutes=None, name=None):
    """Run one algorithm on the toy model, to its last epoch or, with `minutes`, until that much wall clock has
    passed: an alarm stops it as Ctrl-C would, and its last finished epoch's checkpoint is the result (checkpoints
    are written atomically, so a stop at any moment leaves a whole one). Returns (args, run directory, seconds)."""
    module = importlib.import_module(algorithm)
    run_dir = os.path.join(workdir, f"{name or algorithm}-seed{seed}")
    argv = ["--model", "toy", "--output-dir", run_dir, "--seed", str(seed), "--device", "cpu", *extra_argv]
    args = bookkeeping.parse_args(module.Args, argv, presets=module.PRESETS)

    stopped = []

    def out_of_time(signum, frame):
        if not stopped:
            raise OutOfTime
    previous = signal.signal(signal.SIGALRM, out_of_time)
    start = time.perf_counter()
    # then again every second: an exception raised while Python runs a weakref callback or a __del__ is printed
    # ("Exception ignored in ...") and dropped, so one alarm is not always enough
    signal.setitimer(signal.ITIMER_REAL, 60 * minutes if minutes else 0, 1.0)
    try:
        module.main(argv)
    except OutOfTime:
        stopped.append(True)
        bookkeeping.release_output_dir(args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return args, run_dir, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=["ddpo", "d3po", "prdp"], choices=["ddpo", "d3po", "prdp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's --num-epochs")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"), help="where grids go")
    parser.add_argument("--eval-images", type=int, default=EVAL_IMAGES_PER_PROMPT,
                        help="held-apart images of each prompt to measure (more for fewer prompts)")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    opts, script_flags = parser.parse_args(argv[:split]), argv[split + 1:]
    extra = (["--num-epochs", str(opts.epochs)] if opts.epochs else []) + script_flags
    os.makedirs(opts.results, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for algorithm in opts.algorithms:
            for seed in opts.seeds:
                args, run_dir, seconds = fine_tune(algorithm, seed, extra, workdir)
                prompts = bookkeeping.load_prompts(args.prompt_file)
                before, before_images = measure(load_trained(args), args, prompts, opts.eval_images)
                after, after_images = measure(load_trained(args, run_dir), args, prompts, opts.eval_images)
                rows.append((algorithm, seed, before, after, seconds, args.num_epochs))
                if seed == opts.seeds[0]:
                    captions = [p.replace("a ", "", 1).replace(" on the", "") for p in prompts]
                    for when, images in (("before", before_images), ("after", after_images)):
                        bookkeeping.save_grid(images, captions, os.path.join(opts.results, f"{algorithm}_{when}.png"),
                                              columns=6, scale=4)
    print(f"\nshapes world: {opts.eval_images} images for each of the {len(prompts)} prompts from held-apart noise, "
          f"before -> after fine-tuning")
    if script_flags:
        print(f"flags given to the training scripts: {' '.join(script_flags)}")
    print(f"{'algorithm':<10}{'seed':>5}{'epochs':>7}{'minutes':>8}  {'own reward':<26}{'alignment':<26}"
          f"{'+- s.e.':>8}  {'fully right %':<26}{'area %':<26}")
    for algorithm, seed, b, a, seconds, epochs in rows:
        cells = ["".join(f"{b[k]:6.3g} -> {a[k]:6.3g} ({a[k] - b[k]:+.2g})".ljust(26) for k in keys)
                 for keys in (("reward", "alignment"), ("fully_right", "area"))]
        print(f"{algorithm:<10}{seed:>5}{epochs:>7}{seconds / 60:>8.1f}  {cells[0]}{paired_se(b, a):>8.2f}  {cells[1]}")
    print("+- s.e.: standard error of the alignment change, from the per-image changes on the same evaluation noise "
          "(it measures the evaluation's noise, not the spread between training seeds)")
    for algorithm in opts.algorithms:
        for key in ("reward", "alignment", "area"):
            gains = [a[key] - b[key] for al, _, b, a, _, _ in rows if al == algorithm]
            print(f"{algorithm}: {key} change {np.mean(gains):+.3g} on average, smallest {min(gains):+.3g}")
    return rows


if __name__ == "__main__":
    main()
