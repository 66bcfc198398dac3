"""The toy model's held-apart measurement: a run's shape area, prompt alignment and (with kl=True) KL to its
start, on every prompt drawn --eval-images times from EVAL_SEED, a seed no training run uses (training draws from
seed * 1_000_003 + epoch); plumbing/evaluate.py's sampling, so its numbers and the benchmarks' are the same."""
import numpy as np

import common
from plumbing import bookkeeping
from plumbing.evaluate import EVAL_SEED, held_apart_samples  # noqa: F401 (the tests and notebooks read EVAL_SEED here)
from plumbing.rewards import compute_rewards, get_reward_fn
from toy_model.world import shape_area, shape_scores

EVAL_IMAGES_PER_PROMPT = 16


def load_trained(args, run_dir=None, reference=False):
    """The toy model's policy as configured by `args`; with run_dir, with that run's weights; reference=True keeps
    the untrained model as its reference (measure's kl=True needs it)."""
    policy, params = common.load_policy(args, reference)
    if run_dir is not None:
        optimizer = common.make_optimizer(params, args.learning_rate, args.weight_decay)
        bookkeeping.load_checkpoint(policy.pipe, optimizer, common.make_scaler(args.device, args.mixed_precision),
                                    run_dir)
    return policy


def measure(policy, args, prompts, images_per_prompt=EVAL_IMAGES_PER_PROMPT, kl=False):
    """On the held-apart evaluation noise (drawn as common.evaluate draws it, in batches of 32, whatever the run's
    batch size): the run's own reward, alignment (soft x 100, and % fully right) and shape area (% of the image),
    with their per-image values and every image ("images"); also one image per prompt for the grids. kl=True (a
    policy loaded with reference=True) adds KL(p_theta || p_ref) of each trajectory x_T..x_0 in nats, by the plain
    Monte Carlo estimator "k1": its log-ratio sum_t log pi_theta / pi_ref on the policy's own samples (the per-element
    log-probs times the latent's C x h x w elements), and "kl_steps", each step's share averaged over samples."""
    policy.pipe.unet.eval()
    eval_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    samples, log_ratio = held_apart_samples(policy, args, prompts, images_per_prompt, kl)  # plumbing/evaluate.py's
    images = samples.images
    soft, hard, _ = shape_scores(images, eval_prompts)
    reward = compute_rewards(get_reward_fn(args.reward), images, eval_prompts)
    area = shape_area(images, eval_prompts)
    result = {"reward": float(reward.mean()), "alignment": 100 * float(soft.mean()), "per_image_alignment": soft,
              "fully_right": 100 * float(hard.mean()), "area": 100 * float(area.mean()), "per_image_area": area,
              "images": images}
    if kl:
        result.update(kl=log_ratio.sum(1).numpy(), kl_steps=log_ratio.mean(0).numpy())
    return result, images[::images_per_prompt]


def paired_se(before, after, key="alignment"):
    """Standard error (x 100) of the mean change of alignment (or area): before and after share every image's
    noise, so the per-image differences are what varies."""
    diff = after[f"per_image_{key}"] - before[f"per_image_{key}"]
    return 100 * float(diff.std(ddof=1) / np.sqrt(len(diff)))
