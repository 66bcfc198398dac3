"""Time per epoch and UNet calls per phase, on a tiny pipeline built from configs (no download, CPU is fine).

    python benchmarks/speed.py                     # ddpo.py, 3 epochs, 20 steps, 32 px
    python benchmarks/speed.py --steps 50 --epochs 5

For each phase it prints seconds per epoch and how many UNet calls were made against the fewest the
algorithm needs: sampling needs one call per denoising step per sampling batch (the conditional and
unconditional halves of guidance batched together); DDPO's training needs one per trained step per training
batch per inner epoch.
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402


@contextlib.contextmanager
def count_unet_calls():
    """Counts UNet forward calls made while sampling and while training: yields {'sample': n, 'train': n}."""
    counts, phase = {"sample": 0, "train": 0}, ["other"]
    originals = {name: getattr(common, name) for name in ("load_pipeline", "sample_trajectories", "recompute_log_probs")}

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            phase[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = "other"
        return wrapped

    def load_pipeline(*args, **kwargs):
        pipe, params, autocast = originals["load_pipeline"](*args, **kwargs)
        pipe.unet.register_forward_hook(lambda *a: counts.__setitem__(phase[0], counts.get(phase[0], 0) + 1))
        return pipe, params, autocast

    common.load_pipeline = load_pipeline
    common.sample_trajectories = in_phase("sample", originals["sample_trajectories"])
    common.recompute_log_probs = in_phase("train", originals["recompute_log_probs"])
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(common, name, fn)


def minimum_calls(algorithm, args):
    """The fewest UNet calls one epoch of `algorithm` needs with these settings: (sample, train)."""
    sample = args.sample_batches_per_epoch * args.num_steps
    n = args.sample_batch_size * args.sample_batches_per_epoch
    if algorithm == "ddpo":
        trained_steps = max(1, int(args.num_steps * args.timestep_fraction))
        return sample, args.inner_epochs * (n // args.train_batch_size) * trained_steps
    raise ValueError(algorithm)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", default="ddpo", choices=["ddpo"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=32)
    opts = parser.parse_args()
    module = __import__(opts.algorithm)
    with tempfile.TemporaryDirectory() as tmp:
        from tiny_pipeline import make_tiny_pipeline
        model = make_tiny_pipeline(os.path.join(tmp, "tiny"), resolution=opts.resolution)
        prompts = os.path.join(tmp, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("a cat\na dog\na photo of a horse\n")
        argv = ["--model", model, "--prompt-file", prompts, "--output-dir", os.path.join(tmp, "run"),
                "--num-epochs", str(opts.epochs), "--resolution", str(opts.resolution), "--num-steps", str(opts.steps),
                "--sample-batch-size", "8", "--sample-batches-per-epoch", "2", "--train-batch-size", "4",
                "--device", "cpu"]
        start = time.perf_counter()
        with count_unet_calls() as counts:
            module.main(argv)
        wall = time.perf_counter() - start
        rows = common.read_metrics(os.path.join(tmp, "run"))
        args = common.parse_args(module.Args, argv)
    min_sample, min_train = minimum_calls(opts.algorithm, args)
    per_epoch = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    print(f"\n{opts.algorithm}.py on a tiny pipeline: {opts.epochs} epochs, {opts.steps} steps, "
          f"{args.sample_batch_size * args.sample_batches_per_epoch} samples/epoch, {opts.resolution} px, "
          f"{wall:.1f} s wall in all")
    print(f"{'phase':<10}{'s/epoch':>10}{'UNet calls/epoch':>20}{'minimum':>10}")
    print(f"{'sampling':<10}{per_epoch('sample_seconds'):>10.2f}{counts['sample'] / opts.epochs:>20.0f}{min_sample:>10}")
    print(f"{'training':<10}{per_epoch('train_seconds'):>10.2f}{counts['train'] / opts.epochs:>20.0f}{min_train:>10}")
    print(f"{'other':<10}{'':>10}{counts.get('other', 0) / opts.epochs:>20.0f}{0:>10}")


if __name__ == "__main__":
    main()
