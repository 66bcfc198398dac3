"""DDPO: Training Diffusion Models with Reinforcement Learning (Black et al., arXiv 2305.13301).

Denoising is a decision process whose policy pi_theta(x_{t-1} | x_t, c) is one stochastic DDIM step (common.py).
The reward r(x_0, c) comes at the end, and a policy gradient over all T steps maximises E[r], with A the reward
normalised per prompt: DDPO_SF, E[ sum_t grad log pi_theta * A ], or DDPO_IS, E[ sum_t pi_theta / pi_old grad
log pi_theta * A ] with PPO's clip, so that several optimiser steps can reuse one epoch's samples (Sec. 4.3).
Lines that are the algorithm's own are marked ALGO LOGIC; `diff ddpo.py d3po.py` and `diff ddpo.py prdp.py` show
them.
"""
from dataclasses import dataclass

import plumbing  # noqa: F401 (first: Ctrl-C while torch loads ends in one line, plumbing/__init__.py)
import numpy as np
import torch
from tqdm.auto import tqdm

import common
from plumbing import bookkeeping, distributed
from plumbing.bookkeeping import arg
from plumbing.rewards import compute_rewards, get_reward_fn


@dataclass
class Args:
    # --- shared by ddpo.py, d3po.py and prdp.py ---
    model: str = arg("stable-diffusion-v1-5/stable-diffusion-v1-5", "hub id or local diffusers directory (the papers "
                     "fine-tune SD v1.4/v1.5)")
    prompt_file: str = arg("animals.txt", "prompts, one a line; '#' comments (DDPO's 45 common animals, as D3PO's and "
                           "PRDP Table 4's)")
    reward: str = arg("jpeg_compressibility", "reward name, or module:function for your own "
                      "(DDPO Sec. 6.1)")
    output_dir: str = arg("runs/ddpo", "where config, metrics, image grids, weights and checkpoint are written")
    num_epochs: int = arg(100, "epochs of sample-then-train (DDPO reference compressibility config, PRDP Table 4: 100)")
    seed: int = arg(0, "random seed; each epoch's randomness is derived from it, so resumed runs match")
    resolution: int = arg(512, "image size in pixels, a multiple of 8 (SD v1.5 at 512, as in the papers)")
    num_steps: int = arg(50, "DDIM steps T (DDPO reference base config, PRDP setup: 50)")
    eta: float = arg(1.0, "DDIM stochasticity, in (0, 1] (the papers: 1.0, the DDPM posterior variance)")
    noise_level: float = arg(0.7, "a flow model's (SD3) step noise a, sigma_t = a sqrt(t / (1 - t)) (Flow-GRPO "
                             "paper: 0.7)", within="(0, inf)")
    max_sequence_length: int = arg(256, "a flow model's (SD3) T5 prompt tokens, zeros without T5 (diffusers' SD3 "
                                   "pipeline: 256; Flow-GRPO paper's code: 128)", within="[1, inf)")
    guidance_scale: float = arg(5.0, "classifier-free guidance w, at sampling and training (the papers: 5.0)")
    sample_batch_size: int = arg(8, "images per sampling batch (DDPO reference dgx configs: 8 per GPU)")
    sample_batches_per_epoch: int = arg(4, "sampling batches per epoch (DDPO reference dgx configs: 4)")
    train_batch_size: int = arg(4, "images per training batch (DDPO reference compressibility config: 4)")
    gradient_accumulation_steps: int = arg(2, "training batches per optimiser step (DDPO reference: 2)")
    learning_rate: float = arg(3e-4, "AdamW learning rate (DDPO reference: 3e-4 with LoRA; about 1e-5 in full)")
    weight_decay: float = arg(1e-4, "AdamW weight decay (the papers' reference code: 1e-4)")
    max_grad_norm: float = arg(1.0, "gradient-norm clip (the papers' reference code: 1.0)")
    lora_rank: int = arg(4, "LoRA rank on the layers of --lora-targets; 0 trains the whole UNet (DDPO reference: 4)")
    lora_targets: str = arg("attention", "the layers LoRA adapts: attention = every attention projection (the "
                            "papers' LoRA code), cross-attention = only those that read the prompt (attn2)",
                            choices=["attention", "cross-attention"])
    mixed_precision: str = arg("auto", "UNet compute dtype; auto = fp16 on CUDA (reference code), no on CPU",
                               choices=["auto", "no", "fp16", "bf16"])
    gradient_checkpointing: bool = arg(False, "recompute the UNet's activations in the backward pass, and on a CPU "
                                       "give freed memory back at once, for the whole process: less memory, more "
                                       "time (docs/scale.md)")
    tensorboard: bool = arg(False, "also log the metrics for TensorBoard, in <output-dir>/tensorboard (pip install "
                            "tensorboard; then tensorboard --logdir <output-dir>)")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    process_timeout: float = arg(600.0, "torchrun: seconds a process waits for the others before the run stops "
                                 "(gloo's and NCCL's own: 30 minutes)", within="(0, inf)")
    resume: str = arg(None, "continue the run in this output directory from its last finished epoch")
    # --- DDPO's own ---
    estimator: str = arg("is", "is = clipped importance sampling, sf = score function (DDPO Sec. 4.3: is)",
                         choices=["is", "sf"])
    clip_range: float = arg(1e-4, "PPO clip of the ratio pi/pi_old, per element (reference: 1e-4)", within="(0, inf)")
    adv_clip_max: float = arg(5.0, "advantages are clipped to [-a, a] (reference: 5)", within="(0, inf)")
    per_prompt_buffer_size: int = arg(16, "rewards kept per prompt to normalise (reference: 16)", within="[1, inf)")
    per_prompt_min_count: int = arg(16, "rewards a prompt needs to use its own (reference: 16)", within="[1, inf)")
    timestep_fraction: float = arg(1.0, "share of each trajectory's steps trained (reference: 1.0)", within="(0, 1]")
    inner_epochs: int = arg(1, "passes over each epoch's samples (reference: 1)", within="[1, inf)")


# Defaults for the shapes-world toy model (--model toy; flags you give still win); docs/shapes_world.md, "Learning on a
# laptop", says how they were found and what else was tried.
PRESETS = {"toy": dict(
    prompt_file="tutorials/shapes.txt", reward="shape_area", num_epochs=30, resolution=32, num_steps=10,
    guidance_scale=1.0, sample_batch_size=32, sample_batches_per_epoch=2, train_batch_size=32,
    gradient_accumulation_steps=2, learning_rate=2.5e-4, lora_rank=0, per_prompt_min_count=4, inner_epochs=2,
    timestep_fraction=0.5, clip_range=0.2)}
# the same world learned as a flow (docs/flow.md; the README's flow commands give DDPO and PRDP tighter clips)
PRESETS["flow-toy"] = dict(PRESETS["toy"], max_sequence_length=8)


# ALGO LOGIC: advantages, the rewards normalised per prompt (reference code's PerPromptStatTracker)
def per_prompt_advantages(stats, prompts, rewards, buffer_size, min_count):
    """A = (r - mean) / (std + 1e-6), over the prompt's last rewards in `stats` (updated) once it has min_count."""
    prompts, rewards = np.asarray(prompts), np.asarray(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards)
    for prompt in np.unique(prompts):
        mask = prompts == prompt
        buffer = stats[str(prompt)] = (stats.get(str(prompt), []) + rewards[mask].tolist())[-buffer_size:]
        ref = np.array(buffer) if len(buffer) >= min_count else rewards
        advantages[mask] = (rewards[mask] - ref.mean()) / (ref.std() + 1e-6)
    return torch.as_tensor(advantages, dtype=torch.float32)


# ALGO LOGIC: what an epoch logs, beside the rewards and times (docs/outputs.md says what each means)
METRICS = ("loss", "approx_kl", "clipfrac")


# ALGO LOGIC: the DDPO loss of one denoising step for a batch of samples
def ddpo_loss(log_probs, old_log_probs, advantages, clip_range, adv_clip_max, estimator="is"):
    """log_probs (b,) of one step under pi_theta, old_log_probs (b,) under pi_old, advantages (b,)."""
    advantages = advantages.to(log_probs.device).clamp(-adv_clip_max, adv_clip_max)  # reference code
    ratio = torch.exp(log_probs - old_log_probs)                            # pi_theta / pi_old, DDPO Sec. 4.3
    if estimator == "sf":
        loss = (-advantages * log_probs).mean()                             # DDPO Sec. 4.3, DDPO_SF
    else:
        pg_loss1 = -advantages * ratio                                      # DDPO Sec. 4.3, DDPO_IS
        pg_loss2 = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)  # PPO clip, reference code
        loss = torch.maximum(pg_loss1, pg_loss2).mean()                     # DDPO Sec. 4.3, pessimistic (PPO)
    info = {"approx_kl": 0.5 * ((log_probs - old_log_probs) ** 2).mean().detach(),  # as the reference code logs
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean()}
    return loss, info


# ALGO LOGIC: the algorithm's own checks of its settings, before any model is loaded
def check_args(args):
    bookkeeping.check_args(args)
    batches = args.inner_epochs * args.sample_batch_size * args.sample_batches_per_epoch // args.train_batch_size
    if args.estimator == "sf" and batches > args.gradient_accumulation_steps:  # later steps: older samples, unweighted
        raise common.UserError("--estimator sf takes one optimiser step an epoch (DDPO Sec. 4.3), not several: make "
                               "--train-batch-size x --gradient-accumulation-steps all samples, --inner-epochs 1.")


def main(argv=None):
    args = bookkeeping.parse_args(Args, argv, description=__doc__, presets=PRESETS)
    check_args(args)
    prompts = bookkeeping.load_prompts(args.prompt_file)
    reward_fn = get_reward_fn(args.reward)  # ALGO LOGIC: one reward
    policy, params = common.load_policy(args)  # ALGO LOGIC: no reference model
    bookkeeping.say_long_prompts(policy.pipe.tokenizer, prompts)  # cut to the text encoder's window
    optimizer = common.make_optimizer(params, args.learning_rate, args.weight_decay)
    scaler = common.make_scaler(args.device, args.mixed_precision)
    resumed = bookkeeping.load_checkpoint(policy.pipe, optimizer, scaler, args.output_dir) if args.resume else None
    start_epoch, extra = resumed or (0, {})
    bookkeeping.start_output(args, start_epoch)

    for epoch in tqdm(range(start_epoch, args.num_epochs), desc="epochs", initial=start_epoch, total=args.num_epochs):
        generator = bookkeeping.epoch_generator(args.seed, epoch)
        info = {key: [] for key in METRICS}  # the values logged in the epoch
        # ---- 1. ALGO LOGIC: sample images with the current policy (this epoch's pi_old) and score them ----
        policy.pipe.unet.eval()
        with bookkeeping.Timer() as sample_timer:
            batch_prompts, samples = distributed.sample_epoch(policy, args, prompts, generator)
            rewards = compute_rewards(reward_fn, samples.images, batch_prompts, epoch)  # (n,)
            # ---- 2. ALGO LOGIC: what to learn from the rewards: per-prompt normalised advantages ----
            advantages = per_prompt_advantages(extra.setdefault("stats", {}), batch_prompts, rewards,  # (n,)
                                               args.per_prompt_buffer_size, args.per_prompt_min_count).to(args.device)
            order = torch.cat([torch.randperm(len(rewards), generator=generator) for _ in range(args.inner_epochs)])
            trained_steps = max(1, int(args.num_steps * args.timestep_fraction))  # of each trajectory
            step_size = args.train_batch_size * args.gradient_accumulation_steps  # images an optimiser step

        # ---- 3. ALGO LOGIC: train on the stored steps x_t -> x_{t-1}, one optimiser step per accumulated batches ----
        policy.pipe.unet.train()
        with bookkeeping.Timer() as train_timer:
            for step_batches in common.minibatches(order.to(args.device), args.train_batch_size, step_size):
                # each sample visits its steps in its own random order (reference code)
                orders = [torch.stack([torch.randperm(args.num_steps, generator=generator) for _ in idx]).to(idx.device)
                          for idx in step_batches]                                           # (b, T)
                for idx, steps in distributed.share(zip(step_batches, orders)):  # torchrun: this process's (one: all)
                    for j in range(trained_steps):
                        s = steps[:, j]                                                      # (b,) a step each
                        log_probs = common.log_prob(policy, samples, idx, s)                 # log pi_theta, (b,)
                        loss, step_info = ddpo_loss(log_probs, samples.log_probs[idx, s], advantages[idx],
                                                    args.clip_range, args.adv_clip_max, args.estimator)
                        scaler.scale(loss / (trained_steps * len(step_batches))).backward()  # mean of the step
                        bookkeeping.log_info(info, loss=loss, **step_info)
                norm = distributed.optimizer_step(optimizer, scaler, params, args.max_grad_norm)  # before clipping
                bookkeeping.log_info(info, grad_norm=norm)

        # ---- 4. log, show, save ----
        metrics = bookkeeping.epoch_metrics(epoch, rewards, info, sample_timer, train_timer, args.reward)
        bookkeeping.end_epoch(policy.pipe, optimizer, scaler, args, epoch, metrics, samples.images, batch_prompts,
                              rewards, extra)
        del samples  # this epoch's trajectories are not kept (on the GPU) through the next epoch's sampling
    bookkeeping.finish(args)


if __name__ == "__main__":
    bookkeeping.run_main(main)
