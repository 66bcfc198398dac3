"""Time per epoch and UNet calls per phase, on a tiny pipeline built from configs (no download, CPU is fine).

    python benchmarks/speed.py                     # ddpo.py, 3 epochs, 20 steps, 32 px
    python benchmarks/speed.py --algorithm prdp --steps 50 --epochs 5
    python benchmarks/speed.py --reward aesthetic  # a learned reward, on tiny stand-ins of its models

For each phase it prints seconds per epoch and how many UNet calls were made against the fewest the
algorithm needs (see minimum_calls), and the seconds the reward took, part of the sampling phase's.
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from plumbing import bookkeeping  # noqa: E402
import common  # noqa: E402


@contextlib.contextmanager
def count_unet_calls():
    """Counts UNet forward calls made while sampling, computing reference log-probs and training: yields
    {'sample': n, 'reference': n, 'train': n} (and 'other' for anything else)."""
    counts, phase = {"sample": 0, "reference": 0, "train": 0}, ["other"]
    names = {"sample_trajectories": "sample", "reference_log_probs": "reference", "log_prob": "train"}
    originals = {name: getattr(common, name) for name in ("load_pipeline", *names)}

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            if phase[0] != "other":  # reference_log_probs calls log_prob: the outer phase counts
                return fn(*args, **kwargs)
            phase[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = "other"
        return wrapped

    def count(*_):
        counts[phase[0]] = counts.get(phase[0], 0) + 1

    def load_pipeline(*args, **kwargs):  # common.load_policy calls it too
        pipe, params, autocast = originals["load_pipeline"](*args, **kwargs)
        for unet in (pipe.unet, getattr(pipe, "reference_unet", None)):
            if unet is not None:
                unet.register_forward_hook(count)
        return pipe, params, autocast

    common.load_pipeline = load_pipeline
    for name, label in names.items():
        setattr(common, name, in_phase(label, originals[name]))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(common, name, fn)


def minimum_calls(algorithm, args, rows):
    """The fewest UNet calls the run needs with these settings, summed over its epochs (metrics `rows`), by phase.

    Every phase batches the conditional and unconditional halves of guidance into one call. Sampling: one call
    per step per sampling batch. Reference log-probs, once per epoch and only for the images that will be trained
    (ties are never trained): D3PO the images of decided pairs, PRDP those of prompts with at least one decided
    pair; one call per step per sampling batch of them. Training: DDPO one call per trained step per training
    batch and inner epoch; D3PO one per step per batch of pairs (ties are dropped, so it depends on the epoch's
    pairs); PRDP one per step per training batch of prompts with pairs with a graph, plus, from the second
    gradient step of an epoch on, one without (the loss needs the whole trajectory's log-ratio before
    any step can be backpropagated; at theta_old the sampled log-probs serve)."""
    epochs, T = len(rows), args.num_steps
    calls = {"sample": epochs * args.sample_batches_per_epoch * T, "reference": 0}
    n = args.sample_batch_size * args.sample_batches_per_epoch
    if algorithm == "ddpo":
        trained_steps = max(1, int(T * args.timestep_fraction))
        calls["train"] = epochs * args.inner_epochs * (n // args.train_batch_size) * trained_steps
    elif algorithm == "d3po":
        calls["reference"] = sum(-(-2 * r["pairs"] // args.sample_batch_size) for r in rows) * T
        calls["train"] = sum(-(-r["pairs"] // (args.train_batch_size // 2)) for r in rows) * T
    elif algorithm == "prdp":
        B, K = args.images_per_prompt, args.grad_steps_per_epoch
        calls["reference"] = sum(-(-B * r["trained_prompts"] // args.sample_batch_size) for r in rows) * T
        # a loss batch is whole prompts (per_batch of them), in UNet calls of at most --train-batch-size images
        per_batch, chunks = max(1, args.train_batch_size // B), max(1, B // args.train_batch_size)
        step_prompts = args.train_batch_size * args.gradient_accumulation_steps // B
        batches = [-(-min(step_prompts, r["trained_prompts"]) // per_batch)
                   for r in rows]  # loss batches in each gradient step of an epoch
        calls["train"] = sum(batches) * chunks * (2 * K - 1) * T
    else:
        raise ValueError(algorithm)
    return calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", default="ddpo", choices=["ddpo", "d3po", "prdp"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--reward", default="jpeg_compressibility",
                        help="a reward or mix; learned ones run on tiny random models of their architecture")
    opts = parser.parse_args()
    module = __import__(opts.algorithm)
    with tempfile.TemporaryDirectory() as tmp:
        from tiny_pipeline import make_tiny_pipeline, make_tiny_reward_models
        model = make_tiny_pipeline(os.path.join(tmp, "tiny"), resolution=opts.resolution)
        for key, where in make_tiny_reward_models(os.path.join(tmp, "rewards")).items():
            os.environ.setdefault(key, where)  # (a copy of the real model named in the environment still wins)
        reward_seconds, compute_rewards = [], module.compute_rewards

        def timed_rewards(*args, **kwargs):
            start = time.perf_counter()
            try:
                return compute_rewards(*args, **kwargs)
            finally:
                reward_seconds.append(time.perf_counter() - start)
        module.compute_rewards = timed_rewards
        prompts = os.path.join(tmp, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("a cat\na dog\na photo of a horse\n")
        argv = ["--model", model, "--prompt-file", prompts, "--output-dir", os.path.join(tmp, "run"),
                "--num-epochs", str(opts.epochs), "--resolution", str(opts.resolution), "--num-steps", str(opts.steps),
                "--sample-batch-size", "8", "--sample-batches-per-epoch", "2", "--train-batch-size", "4",
                "--gradient-accumulation-steps", "2", "--device", "cpu", "--reward", opts.reward]
        if opts.algorithm == "prdp":
            argv += ["--images-per-prompt", "4", "--grad-steps-per-epoch", "2"]
        start = time.perf_counter()
        with count_unet_calls() as counts:
            module.main(argv)
        wall = time.perf_counter() - start
        rows = bookkeeping.read_metrics(os.path.join(tmp, "run"))
        args = bookkeeping.parse_args(module.Args, argv)
    minimum = minimum_calls(opts.algorithm, args, rows)
    per_epoch = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    print(f"\n{opts.algorithm}.py on a tiny pipeline: {opts.epochs} epochs, {opts.steps} steps, "
          f"{args.sample_batch_size * args.sample_batches_per_epoch} samples/epoch, {opts.resolution} px, "
          f"{wall:.1f} s wall in all")
    print(f"{'phase':<11}{'s/epoch':>10}{'UNet calls/epoch':>20}{'minimum':>10}")
    print(f"{'sampling':<11}{per_epoch('sample_seconds'):>10.2f}{counts['sample'] / opts.epochs:>20.0f}"
          f"{minimum['sample'] / opts.epochs:>10.0f}")
    print(f"{'reference':<11}{'(in sampling)':>10}{counts['reference'] / opts.epochs:>20.0f}"
          f"{minimum['reference'] / opts.epochs:>10.0f}")
    print(f"{'training':<11}{per_epoch('train_seconds'):>10.2f}{counts['train'] / opts.epochs:>20.0f}"
          f"{minimum['train'] / opts.epochs:>10.0f}")
    print(f"{'other':<11}{'':>10}{counts.get('other', 0) / opts.epochs:>20.0f}{0:>10}")
    print(f"reward {opts.reward}: {sum(reward_seconds) / opts.epochs:.2f} s/epoch of the sampling phase's "
          f"{per_epoch('sample_seconds'):.2f}")


if __name__ == "__main__":
    main()
