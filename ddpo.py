"""DDPO: Training Diffusion Models with Reinforcement Learning (Black et al., arXiv 2305.13301).

Denoising is a T-step decision process: the state is (c, t, x_t), the action x_{t-1}, and the policy
pi_theta(x_{t-1} | x_t, c) is one guided stochastic DDIM step (common.ddim_step_with_logprob). The reward
r(x_0, c) arrives only at the end. DDPO maximises E[r] with a policy gradient over all T steps:

  DDPO_SF (Sec. 4.3, score function):        grad J = E[ sum_t grad log pi_theta(x_{t-1} | x_t, c) * A ]
  DDPO_IS (Sec. 4.3, importance sampling):   grad J = E[ sum_t pi_theta / pi_old * grad log pi_theta * A ]
with the ratio pi_theta / pi_old clipped as in PPO, so that several optimiser steps can reuse one epoch's
samples. A is the reward normalised per prompt (Sec. 5 / reference code's PerPromptStatTracker).

Scale: log-probs are MEANS over latent elements (the reference code's convention), so the clip range
(1e-4) is a bound on a per-element ratio. Everything else is in common.py; the lines that are DDPO's own
are marked "ALGO LOGIC".
"""
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

import common
from common import arg


@dataclass
class Args:
    # --- shared by ddpo.py, d3po.py and prdp.py ---
    model: str = arg("stable-diffusion-v1-5/stable-diffusion-v1-5",
                     "hub id or local diffusers directory (the papers fine-tune SD v1.4/v1.5)")
    prompt_file: str = arg("animals.txt", "prompts, one a line; '#' comments (DDPO: the 45 common animals)")
    reward: str = arg("jpeg_compressibility", "reward name, or module:function for your own (DDPO Sec. 6.1)")
    output_dir: str = arg("runs/ddpo", "where config, metrics, image grids, LoRA and checkpoint are written")
    num_epochs: int = arg(100, "epochs of sample-then-train (DDPO reference compressibility config: 100)")
    seed: int = arg(0, "random seed; each epoch's randomness is derived from it, so resumed runs match")
    resolution: int = arg(512, "image size in pixels (SD v1.5 at 512, as in the papers)")
    num_steps: int = arg(50, "DDIM steps T (DDPO reference base config: 50)")
    eta: float = arg(1.0, "DDIM stochasticity, in (0, 1] (reference: 1.0, the DDPM posterior variance)")
    guidance_scale: float = arg(5.0, "classifier-free guidance w, at sampling and training (reference: 5.0)")
    sample_batch_size: int = arg(8, "images per sampling batch (reference dgx configs: 8 per GPU)")
    sample_batches_per_epoch: int = arg(4, "sampling batches per epoch (reference dgx configs: 4)")
    train_batch_size: int = arg(4, "samples per training batch (reference compressibility config: 4)")
    gradient_accumulation_steps: int = arg(2, "training batches per optimiser step (reference: 2)")
    learning_rate: float = arg(3e-4, "AdamW learning rate (reference: 3e-4 with LoRA; about 1e-5 for full)")
    weight_decay: float = arg(1e-4, "AdamW weight decay (reference: 1e-4)")
    max_grad_norm: float = arg(1.0, "gradient-norm clip (reference: 1.0)")
    lora_rank: int = arg(4, "LoRA rank on the layers of --lora-targets; 0 trains the whole UNet (reference: 4)")
    lora_targets: str = arg("attention", "the layers LoRA adapts: attention = every attention projection "
                            "(reference), cross-attention = only those that read the prompt (attn2)",
                            choices=["attention", "cross-attention"])
    mixed_precision: str = arg("auto", "UNet compute dtype; auto = fp16 on CUDA (reference), no on CPU",
                               choices=["auto", "no", "fp16", "bf16"])
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    resume: str = arg(None, "continue the run in this output directory from its last finished epoch")
    # --- DDPO's own ---
    estimator: str = arg("is", "policy-gradient estimator: is = clipped importance sampling, sf = score "
                         "function (DDPO Sec. 4.3; the paper favours is)", choices=["is", "sf"])
    clip_range: float = arg(1e-4, "PPO clip on the per-step ratio pi/pi_old, per-element scale (reference: 1e-4)")
    adv_clip_max: float = arg(5.0, "advantages are clipped to [-a, a] (reference: 5)")
    per_prompt_buffer_size: int = arg(16, "rewards kept per prompt for normalisation (reference: 16)")
    per_prompt_min_count: int = arg(16, "rewards a prompt needs before its own statistics are used; until then "
                                    "the batch's (reference: 16)")
    timestep_fraction: float = arg(1.0, "fraction of each trajectory's steps trained on (reference: 1.0)")
    inner_epochs: int = arg(1, "passes over each epoch's samples (reference: 1)")


# Defaults for the shapes-world toy model (--model toy; flags you give still win), found by the runs described
# in README.md ("Learning on a laptop"). Why they differ from SD's: a toy sample is cheap (10 steps on
# 4 x 16 x 16 latents), so an epoch takes 64 samples and makes ONE optimiser step from all of them: with 16
# samples a step, the policy-gradient noise (which points along the directions the output is most sensitive
# to) outweighs the signal and every learning rate that moves the model at all degrades it. The 1.5 M
# parameters are fine-tuned whole at 3e-4 (LoRA on its few attention layers barely moved); per-prompt
# baselines start after 4 rewards instead of 16, since 24 prompts share 64 samples. The objective is the
# shape's area, whose better direction is the same for every prompt (the D3PO and PRDP presets learn prompt
# alignment instead, a slower, prompt-dependent objective; README.md). With one optimiser step an epoch
# the ratio is exactly 1 while the epoch trains, so the clip never acts (clipfrac 0): the update is DDPO_SF's.
PRESETS = {"toy": dict(
    prompt_file="tutorials/shapes.txt", reward="shape_area", num_epochs=40, resolution=32, num_steps=10,
    sample_batch_size=32, sample_batches_per_epoch=2, train_batch_size=16, gradient_accumulation_steps=4,
    learning_rate=3e-4, lora_rank=0, per_prompt_min_count=4)}


# ALGO LOGIC: advantages from rewards, normalised per prompt (reference code's PerPromptStatTracker)
class PerPromptStatTracker:
    """Keeps the last `buffer_size` rewards of each prompt. A = (r - mean) / (std + 1e-6), with the prompt's
    buffer once it holds `min_count` rewards, and with the whole batch's statistics before that."""

    def __init__(self, buffer_size, min_count, state=None):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats = {p: deque(r, maxlen=buffer_size) for p, r in (state or {}).items()}

    def update(self, prompts, rewards):
        prompts, rewards = np.asarray(prompts), np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            mask = prompts == prompt
            buffer = self.stats.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            ref = np.array(buffer) if len(buffer) >= self.min_count else rewards
            advantages[mask] = (rewards[mask] - ref.mean()) / (ref.std() + 1e-6)
        return advantages.astype(np.float32)

    def state(self):
        return {p: list(r) for p, r in self.stats.items()}


# ALGO LOGIC: the DDPO loss of one step for a batch of samples
def ddpo_loss(log_probs, old_log_probs, advantages, clip_range, adv_clip_max, estimator="is"):
    """Returns (loss, approx_kl, clipfrac) for log-probs (B,) of one step under pi_theta and pi_old.

    is:  mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) ),  ratio = pi_theta / pi_old
    sf:  mean( -A * log pi_theta )
    """
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_probs - old_log_probs)
    if estimator == "sf":
        loss = (-advantages * log_probs).mean()
    else:
        pg_loss1 = -advantages * ratio
        pg_loss2 = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
        loss = torch.maximum(pg_loss1, pg_loss2).mean()
    approx_kl = 0.5 * ((log_probs - old_log_probs) ** 2).mean()  # as logged by the reference code
    clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, approx_kl.detach(), clipfrac.detach()


def check_args(args):
    common.check_args(args)
    if not 0 < args.timestep_fraction <= 1:
        raise common.UserError(f"--timestep-fraction must be in (0, 1] (got {args.timestep_fraction}).")
    if args.inner_epochs < 1:
        raise common.UserError(f"--inner-epochs must be at least 1 (got {args.inner_epochs}).")


def main(argv=None):
    args = common.parse_args(Args, argv, description=__doc__, presets=PRESETS)
    check_args(args)
    prompts = common.load_prompts(args.prompt_file)
    reward_fn = common.get_reward_fn(args.reward)
    pipe, params, autocast = common.load_pipeline(args.model, args.device, args.mixed_precision, args.lora_rank,
                                                  args.resolution, args.seed, lora_targets=args.lora_targets)
    optimizer = common.make_optimizer(params, args.learning_rate, args.weight_decay)
    scaler = common.make_scaler(args.device, args.mixed_precision)
    start_epoch, extra = common.load_checkpoint(pipe, optimizer, scaler, args.output_dir) if args.resume else (0, {})
    common.start_output(args, start_epoch)
    negative_embeds = common.encode_prompts(pipe, [""])
    stat_tracker = PerPromptStatTracker(args.per_prompt_buffer_size, args.per_prompt_min_count, extra.get("stats"))
    num_train_timesteps = max(1, int(args.num_steps * args.timestep_fraction))

    for epoch in tqdm(range(start_epoch, args.num_epochs), desc="epochs", initial=start_epoch, total=args.num_epochs):
        generator = common.epoch_generator(args.seed, epoch)
        # ---- 1. sample trajectories with the current policy, which is pi_old for this epoch ----
        pipe.unet.eval()
        with common.Timer() as sample_timer:
            batch_prompts, samples = common.sample_epoch(pipe, args, prompts, negative_embeds, generator, autocast)
            rewards = common.compute_rewards(reward_fn, samples.images, batch_prompts)
        # ---- 2. ALGO LOGIC: per-prompt normalised advantages ----
        advantages = torch.as_tensor(stat_tracker.update(batch_prompts, rewards), device=pipe.device)

        # ---- 3. ALGO LOGIC: train on every sampled step, reusing the stored x_t, x_{t-1} and log pi_old ----
        pipe.unet.train()
        info = {"loss": [], "approx_kl": [], "clipfrac": []}
        N, T = samples.log_probs.shape
        with common.Timer() as train_timer:
            for inner_epoch in range(args.inner_epochs):
                order = torch.randperm(N, generator=generator)
                # each sample visits its steps in its own random order (reference code)
                step_order = torch.stack([torch.randperm(T, generator=generator) for _ in range(N)])
                for batch_index, start in enumerate(range(0, N, args.train_batch_size)):
                    idx = order[start:start + args.train_batch_size].to(pipe.device)
                    for j in range(num_train_timesteps):
                        s = step_order[idx.cpu(), j].to(pipe.device)  # (b,) step index of each sample
                        log_probs = common.recompute_log_probs(
                            pipe, samples.latents[idx, s], samples.latents[idx, s + 1], samples.timesteps[s],
                            samples.prompt_embeds[idx], negative_embeds, args.guidance_scale, args.eta, autocast)
                        loss, approx_kl, clipfrac = ddpo_loss(log_probs, samples.log_probs[idx, s], advantages[idx],
                                                              args.clip_range, args.adv_clip_max, args.estimator)
                        # average over the trained steps and the accumulated batches of one optimiser step
                        scaler.scale(loss / (num_train_timesteps * args.gradient_accumulation_steps)).backward()
                        for k, v in (("loss", loss), ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
                            info[k].append(v.item())
                    if (batch_index + 1) % args.gradient_accumulation_steps == 0:
                        common.optimizer_step(optimizer, scaler, params, args.max_grad_norm)

        # ---- 4. log, show, save ----
        metrics = {"epoch": epoch, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                   **{k: float(np.mean(v)) for k, v in info.items()},
                   "sample_seconds": sample_timer.seconds, "train_seconds": train_timer.seconds,
                   "seconds": sample_timer.seconds + train_timer.seconds}
        common.end_epoch(pipe, optimizer, scaler, args, epoch, metrics, samples.images, batch_prompts, rewards,
                         extra={"stats": stat_tracker.state()})
    common.finish(args)


if __name__ == "__main__":
    common.run_main(main)
