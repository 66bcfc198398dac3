"""Score a fine-tuned run against the model it started from: a panel of rewards, diversity and KL, before and after.

    python -m plumbing.evaluate runs/ddpo-animals --rewards aesthetic clip_score hpsv2 --images-per-prompt 8
    python -m plumbing.evaluate runs/toy --rewards shape_area shapes_alignment    # a --model toy run: its own prompts

Both models draw every prompt of the prompt file (the run's own unless --prompt-file) --images-per-prompt times, from
the same noise, held apart from training (EVAL_SEED: training draws from seed * 1_000_003 + epoch), as the run sampled
(its steps, guidance, eta, resolution and precision, from its config.json). The base model is the run's reference:
its --model, with its --start-from weights where it had them. The fine-tuned one is the run's lora/ or unet/, the
weights diffusers loads. Printed, and written as JSON (--output, default <run>/evaluation.json):
- each reward's mean before and after, with its standard error between images, and the change with its paired
  standard error (the two models share every image's noise, so the per-image differences are what varies);
- diversity: the root-mean-square pixel difference (x 100, on [0, 1] pixels) between two images of one prompt, over
  every pair, its mean over prompts (+- s.e. between prompts): a collapse to one image a prompt shows here;
- KL(p_theta || p_ref) of whole trajectories x_T..x_0, in nats: the Monte Carlo estimate on the fine-tuned model's
  own samples, the sum over steps of log pi_theta - log pi_ref (per-element log-probs x the latent's elements).
A before/after grid (one image a prompt) is saved beside the JSON. benchmarks/shapes.py measures with these functions.
"""
import argparse
import dataclasses
import datetime
import os
import types

import numpy as np
import torch

from plumbing import bookkeeping
import common
from common import UserError
from plumbing.rewards import compute_rewards, get_reward_fn

EVAL_SEED = 987_654_321


def held_apart_samples(policy, args, prompts, images_per_prompt, kl=False, batch_size=32):
    """Every prompt images_per_prompt times (side by side) from EVAL_SEED's noise, in batches of batch_size whatever
    the run's. Returns (Trajectories, KL of each trajectory in nats or None); kl=True needs the policy loaded with
    reference=True."""
    eval_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    generator = torch.Generator("cpu").manual_seed(EVAL_SEED)
    batched = dataclasses.replace(args, sample_batch_size=batch_size) if dataclasses.is_dataclass(args) else \
        types.SimpleNamespace(**{**vars(args), "sample_batch_size": batch_size})
    _, samples = common.sample_epoch(policy, batched, eval_prompts, generator, draw=False, progress=False)
    if not kl:
        return samples, None
    ref_log_probs = common.reference_log_probs(policy, samples, batch_size)
    log_ratio = (samples.log_probs - ref_log_probs).cpu().double() * samples.latents[0, 0].numel()   # (n, T), nats
    return samples, log_ratio


def diversity(images, images_per_prompt):
    """Each prompt's root-mean-square pixel difference (x 100) between two of its images, over its pairs: (prompts,)."""
    x = images.detach().float().cpu().clamp(0, 1).flatten(1).view(-1, images_per_prompt, images[0].numel())
    d = (x[:, :, None] - x[:, None]).pow(2).mean(-1).sqrt()                     # (prompts, n, n), zero on the diagonal
    n = images_per_prompt
    return (100 * d.sum((1, 2)) / (n * (n - 1))).double().numpy()


def mean_se(x):
    """The mean of x and its standard error (NaN for one value)."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def compare(before, after):
    """Per-image (or per-prompt) values of the two models, on the same noise -> means, s.e.s and the paired change."""
    (b, b_se), (a, a_se), (c, c_se) = mean_se(before), mean_se(after), mean_se(np.asarray(after) - np.asarray(before))
    return {"before": b, "before_se": b_se, "after": a, "after_se": a_se, "change": c, "change_se": c_se}


def run_config(run_dir):
    config = bookkeeping.read_config(run_dir, "evaluate.py")
    if config is None or not {"model", "prompt_file", "reward"} <= set(config):
        raise UserError(f"evaluate.py {run_dir!r}: no run's config.json there, so it is not a run directory.")
    if config.get("sample_only"):
        raise UserError(f"evaluate.py {run_dir!r} is a round of images to label (d3po.py --sample-only), not a "
                        f"trained run: evaluate the run trained on its labels (d3po.py --labels).")
    return config


def load_run(run_dir, device):
    """(its config as a namespace, a Policy whose UNet is the run's fine-tuned one and whose reference is its base)."""
    config = run_config(run_dir)
    # full weights in the UNet (a LoRA is fused in), the base model kept apart as the reference
    args = types.SimpleNamespace(**{**config, "device": device, "lora_rank": 0, "gradient_checkpointing": False})
    policy, _ = common.load_policy(args, reference=True)
    policy.pipe.unet.requires_grad_(False).eval()
    common.load_start_weights(policy.pipe, run_dir, "evaluate.py")
    return args, policy


def evaluate_run(run_dir, prompts, rewards, images_per_prompt, device, batch_size=32):
    """The before/after comparison of a run, as a dict (what the JSON holds), and the two grids' images."""
    reward_fns = {name: get_reward_fn(name) for name in rewards}  # an unknown reward is refused before loading
    args, policy = load_run(run_dir, device)
    with common.reference_model(policy.pipe):  # the images kept, not the trajectories (GBs at 512 px)
        before = held_apart_samples(policy, args, prompts, images_per_prompt, batch_size=batch_size)[0].images
    after, log_ratio = held_apart_samples(policy, args, prompts, images_per_prompt, kl=True, batch_size=batch_size)
    after = after.images
    eval_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    metrics = {name: compare(compute_rewards(fn, before, eval_prompts).numpy(),
                             compute_rewards(fn, after, eval_prompts).numpy())
               for name, fn in reward_fns.items()}
    if images_per_prompt > 1:
        metrics["diversity"] = compare(diversity(before, images_per_prompt), diversity(after, images_per_prompt))
    kl, kl_se = mean_se(log_ratio.sum(1).numpy())
    result = {"run": os.path.abspath(run_dir), "base": args.model, "start_from": getattr(args, "start_from", None),
              "prompts": len(prompts), "images_per_prompt": images_per_prompt, "eval_seed": EVAL_SEED,
              "date": datetime.date.today().isoformat(), "metrics": metrics,
              "kl": {"mean": kl, "se": kl_se, "per_step": log_ratio.mean(0).tolist()}}
    return result, before[::images_per_prompt], after[::images_per_prompt]


def table(result):
    lines = [f"{'':<22}{'before':>18}{'after':>18}{'change':>18}"]
    for name, m in result["metrics"].items():
        lines.append(f"{name:<22}" + "".join(f"{m[k]:>11.4g} +- {m[k + '_se']:<5.2g}"
                                             for k in ("before", "after", "change")))
    kl = result["kl"]
    lines.append(f"{'KL to the base, nats':<22}{'0':>18}{kl['mean']:>11.4g} +- {kl['se']:<5.2g}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m plumbing.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's --output-dir (its config.json, and lora/ or unet/)")
    parser.add_argument("--prompt-file", help="the prompts to sample (default: the run's own)")
    parser.add_argument("--rewards", nargs="+", help="rewards.py names, mixes or module:function (default: the run's)")
    parser.add_argument("--images-per-prompt", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="images sampled at once (the noise depends on it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="the JSON to write (default: <run_dir>/evaluation.json)")
    opts = parser.parse_args(argv)
    if opts.images_per_prompt < 1 or opts.batch_size < 1:
        raise UserError("--images-per-prompt and --batch-size must be at least 1.")
    config = run_config(opts.run_dir)
    output = opts.output or os.path.join(opts.run_dir, "evaluation.json")
    if os.path.isdir(output):
        raise UserError(f"--output {output!r} is a folder: give the JSON file's path (its .png goes beside it).")
    bookkeeping.make_folder(os.path.dirname(os.path.abspath(output)), "--output's folder")  # before the sampling
    prompts = bookkeeping.load_prompts(opts.prompt_file or config["prompt_file"])
    rewards = opts.rewards or [config["reward"]]
    result, before, after = evaluate_run(opts.run_dir, prompts, rewards, opts.images_per_prompt, opts.device,
                                         opts.batch_size)
    bookkeeping.write_json(output, result)
    pairs = torch.stack([before, after], 1).flatten(0, 1)                   # each prompt's two images side by side
    bookkeeping.save_grid(pairs, [c for p in prompts for c in (p, "fine-tuned")], os.path.splitext(output)[0] + ".png")
    print(f"{opts.run_dir} against its base ({result['base']}), {len(prompts)} prompts x {opts.images_per_prompt} "
          f"images on held-apart noise (mean +- standard error; the change's is paired):\n{table(result)}\n"
          f"written: {output} and its .png")
    return result


if __name__ == "__main__":
    bookkeeping.run_main(main, interrupted="an evaluation does not resume: run it again")
