"""PRDP: Proximal Reward Difference Prediction (Deng et al., arXiv 2402.08714).

Denoising is a decision process whose policy pi_theta(x_{t-1} | x_t, c) is one stochastic DDIM step (common.py).
PRDP maximises E[r] - beta KL(pi_theta || pi_ref) by regression: the log-ratio of a trajectory to the frozen model,
r_hat = log pi_theta / pi_ref (a log-ratio, not a reward), predicts the reward differences of a prompt's images,
(r_hat(a) - r_hat(b) - (r(a) - r(b)) / beta)^2 (Eq. 10-14), each step within eps of theta_old's (Eq. 16-21).
Lines that are the algorithm's own are marked ALGO LOGIC; `diff ddpo.py d3po.py` and `diff ddpo.py prdp.py` show
them.
"""
from dataclasses import dataclass

import plumbing  # noqa: F401 (first: Ctrl-C while torch loads ends in one line, plumbing/__init__.py)
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
                      "(PRDP used HPSv2 and PickScore, not shipped yet)")
    output_dir: str = arg("runs/prdp", "where config, metrics, image grids, weights and checkpoint are written")
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
    sample_batch_size: int = arg(16, "images per sampling batch (PRDP Table 4: B = 16 images of a prompt)")
    sample_batches_per_epoch: int = arg(32, "sampling batches per epoch (PRDP Table 4: N = 32 prompts)")
    train_batch_size: int = arg(16, "images per training batch (PRDP Table 4: B = 16, one prompt's; fewer than "
                                "--images-per-prompt: the UNet batch within a prompt, same gradient, less memory)")
    gradient_accumulation_steps: int = arg(32, "training batches per optimiser step (PRDP Table 4: all N x B)")
    learning_rate: float = arg(1e-5, "AdamW learning rate (PRDP Table 4 small scale: 1e-5)")
    weight_decay: float = arg(1e-4, "AdamW weight decay (the papers' reference code: 1e-4)")
    max_grad_norm: float = arg(1.0, "gradient-norm clip (the papers' reference code: 1.0)")
    lora_rank: int = arg(0, "LoRA rank on the layers of --lora-targets; 0 trains the whole UNet (PRDP: full)")
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
    # --- PRDP's own ---
    beta: float = arg(3e-5, "KL weight, on the scale docs/conventions.md states (PRDP Table 4: 3e-5)", within="(0, inf)")
    clip_eps: float = arg(1e-6, "proximal clip of each step's log-ratio (PRDP Table 4: 1e-6)", within="(0, inf)")
    images_per_prompt: int = arg(16, "images of a prompt, every pair compared (PRDP Table 4: 16)", within="[2, inf)")
    grad_steps_per_epoch: int = arg(10, "gradient steps K an epoch (PRDP Table 4 small scale: 10)", within="[1, inf)")
    shared_noise: bool = arg(False, "a prompt's images start from one x_T, as D3PO's pairs (PRDP does not say)")


# Defaults for the shapes-world toy model (--model toy; flags you give still win); docs/shapes_world.md, "Learning on a
# laptop", says how they were found and what else was tried.
PRESETS = {"toy": dict(
    prompt_file="tutorials/shapes.txt", reward="shape_area", num_epochs=30, resolution=32, num_steps=10,
    guidance_scale=1.0, sample_batch_size=32, sample_batches_per_epoch=2, train_batch_size=32,
    gradient_accumulation_steps=1, learning_rate=3e-4, lora_rank=0, beta=0.1, clip_eps=0.1, images_per_prompt=8,
    grad_steps_per_epoch=2)}
# the same world learned as a flow (docs/flow.md; the README's flow commands give DDPO and PRDP tighter clips)
PRESETS["flow-toy"] = dict(PRESETS["toy"], max_sequence_length=8)


# ALGO LOGIC: every unordered pair of a prompt's images whose rewards differ
def prompt_pairs(rewards, images_per_prompt):
    """rewards (n,) of n images, images_per_prompt consecutive ones a prompt -> pairs (m, 2) of image indices."""
    i, j = torch.triu_indices(images_per_prompt, images_per_prompt, offset=1)
    starts = torch.arange(0, len(rewards), images_per_prompt)[:, None]
    pairs = torch.stack([(starts + i).flatten(), (starts + j).flatten()], 1)
    return pairs[rewards[pairs[:, 0]] != rewards[pairs[:, 1]]]


# ALGO LOGIC: what an epoch logs, beside the rewards and times (docs/outputs.md says what each means)
METRICS = ("loss", "predicted_diff", "actual_diff", "clipfrac", "pairs", "trained_prompts")


# ALGO LOGIC: the PRDP loss over pairs, from per-step log-ratios
def rdp_loss(log_ratio, old_log_ratio, rewards, pairs, beta, clip_eps):
    """log_ratio (n, T) log pi_theta / pi_ref of n images' steps, old_log_ratio (n, T) at theta_old, rewards (n,)."""
    r_hat = log_ratio.mean(1)               # PRDP Eq. 10-14: trajectory log-ratio, the mean over steps (appendix code)
    r_hat_clip = (old_log_ratio + (log_ratio - old_log_ratio).clamp(-clip_eps, clip_eps)).mean(1)  # PRDP Eq. 16-21
    a, b, rewards = *pairs.to(log_ratio.device).unbind(1), rewards.to(log_ratio.device)
    target = (rewards[a] - rewards[b]) / beta                                           # PRDP Eq. 10-14
    loss_unclipped = (r_hat[a] - r_hat[b] - target) ** 2                                # PRDP Eq. 10-14
    loss_clipped = (r_hat_clip[a] - r_hat_clip[b] - target) ** 2                        # PRDP Eq. 16-21
    loss = torch.maximum(loss_unclipped, loss_clipped).mean()                           # PRDP Eq. 16-21, pessimistic
    info = {"predicted_diff": (beta * target.sign() * (r_hat[a] - r_hat[b])).mean().detach(),  # the better one first
            "actual_diff": (rewards[a] - rewards[b]).abs().mean(),
            "clipfrac": ((log_ratio - old_log_ratio).abs() > clip_eps).float().mean()}
    return loss, info


# ALGO LOGIC: the loss of whole trajectories, backpropagated one denoising step at a time
def rdp_backward(policy, samples, idx, ref_log_probs, rewards, args, scale, at_theta_old=False):
    """Backpropagate scale(rdp_loss) of images idx without T UNet graphs at once: the gradient with respect to log-probs
    computed without a graph (at theta_old: the sampled ones), then each step with a graph, in UNet batches of at
    most --train-batch-size images. Exact by the chain rule, so a prompt's images need not fit in one UNet batch."""
    chunks = idx.to(samples.latents.device).split(args.train_batch_size)  # on the GPU, CPU indices would wait for it
    log_probs = samples.log_probs[idx]                                                  # log pi_old, (b, T)
    if not at_theta_old:
        with torch.no_grad():
            log_probs = torch.stack([torch.cat([common.log_prob(policy, samples, c, s) for c in chunks])
                                     for s in range(args.num_steps)], 1)
    log_probs = log_probs.detach().requires_grad_(True)                                 # log pi_theta, (b, T)
    loss, info = rdp_loss(log_probs - ref_log_probs, samples.log_probs[idx] - ref_log_probs, rewards,
                          prompt_pairs(rewards, args.images_per_prompt), args.beta, args.clip_eps)
    scale(loss).backward()
    for s in range(args.num_steps):
        for c, grad in zip(chunks, log_probs.grad[:, s].split(args.train_batch_size)):
            common.log_prob(policy, samples, c, s).backward(grad)
    return loss, info


# ALGO LOGIC: the algorithm's own checks of its settings, before any model is loaded
def check_args(args):
    # all pairs of a prompt's images are compared; a training batch may be a part of a prompt's (rdp_backward)
    bookkeeping.check_args(args, group=args.images_per_prompt, part_of_group=True)


def main(argv=None):
    args = bookkeeping.parse_args(Args, argv, description=__doc__, presets=PRESETS)
    check_args(args)
    prompts = bookkeeping.load_prompts(args.prompt_file)
    reward_fn = get_reward_fn(args.reward)  # ALGO LOGIC: one reward
    policy, params = common.load_policy(args, reference=True)  # ALGO LOGIC: and pi_ref
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
            batch_prompts, samples = distributed.sample_epoch(policy, args, prompts, generator, args.images_per_prompt,
                                                              shared_noise=args.shared_noise)
            rewards = compute_rewards(reward_fn, samples.images, batch_prompts, epoch)  # (n,)
            # ---- 2. ALGO LOGIC: what to learn from the rewards: each prompt's pairs of images that differ ----
            pairs = prompt_pairs(rewards, args.images_per_prompt)           # (m, 2); a prompt whose images tie has none
            trained = pairs.unique().view(-1, args.images_per_prompt)           # the images of each prompt with pairs
            # log pi_ref does not depend on theta: once per trained image, never in the training loop
            ref_log_probs = distributed.reference_log_probs(policy, samples, args.sample_batch_size, trained)
            # K gradient steps, each on up to gradient_accumulation_steps training batches of whole prompts
            step_size = min(args.train_batch_size * args.gradient_accumulation_steps, trained.numel())
            order = torch.cat([trained[torch.randperm(len(trained), generator=generator)].flatten()
                               for _ in range(args.grad_steps_per_epoch)])[:args.grad_steps_per_epoch * step_size]
            bookkeeping.log_info(info, pairs=len(pairs), trained_prompts=len(trained))

        # ---- 3. ALGO LOGIC: K proximal gradient steps on the pairs' squared errors ----
        policy.pipe.unet.train()
        with bookkeeping.Timer() as train_timer:
            loss_batch = max(args.train_batch_size, args.images_per_prompt)  # whole prompts' pairs, PRDP Eq. 10-14
            for k, step_batches in enumerate(common.minibatches(order, loss_batch, step_size)):
                for idx in distributed.share(step_batches):  # torchrun: this process's batches (one process: all)
                    loss, step_info = rdp_backward(policy, samples, idx, ref_log_probs[idx], rewards[idx], args,
                                                   lambda loss: scaler.scale(loss / len(step_batches)), k == 0)
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
