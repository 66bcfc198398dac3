"""PRDP: Proximal Reward Difference Prediction (Deng et al., arXiv 2402.08714).

Denoising is a T-step decision process: the state is (c, t, x_t), the action x_{t-1}, and the policy
pi_theta(x_{t-1} | x_t, c) is one guided stochastic DDIM step (common.ddim_step_with_logprob). PRDP maximises
E[r] - beta * KL(pi_theta || pi_ref), whose optimum is pi* proportional to pi_ref * exp(r / beta), by
REGRESSION: the model's log-ratio to the frozen pretrained model, r_hat = log pi_theta(traj) / pi_ref(traj),
must predict the reward difference of two images of the same prompt (Eqs. 10-14):

  loss(a, b) = ( (r_hat(a) - r_hat(b)) - (r(a) - r(b)) / beta )^2,

zero exactly at that optimum. The proximal update (Eqs. 16-21) clips each step's log-ratio to within eps of
the old (sampling) policy's, r_hat_clip_t = clip(r_hat_t, r_hat_old_t - eps, r_hat_old_t + eps), and takes
the pessimistic max of the unclipped and clipped squared errors.

Scale: a step's log-density is the MEAN over latent elements (the DDPO code PRDP builds on; the other two
scripts do the same) and a trajectory's log-ratio is the MEAN over its T steps (the paper's appendix code).
beta and eps are on that scale; see their help texts for what the paper's Table 4 values would be if it summed
over SD's 4 x 64 x 64 = 16384 latent elements instead. Everything else is in common.py; the lines that are
PRDP's own are marked "ALGO LOGIC".
"""
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
                     "hub id or local diffusers directory (PRDP fine-tuned SD v1.4, the same family)")
    prompt_file: str = arg("animals.txt", "prompts, one a line; '#' comments (PRDP Table 4 small scale: the 45 "
                           "animal prompts)")
    reward: str = arg("jpeg_compressibility", "reward name, or module:function for your own (PRDP used HPSv2 and "
                      "PickScore, which this project does not ship)")
    output_dir: str = arg("runs/prdp", "where config, metrics, image grids, LoRA and checkpoint are written")
    num_epochs: int = arg(100, "epochs of sample-then-train (PRDP Table 4 small scale: 100)")
    seed: int = arg(0, "random seed; each epoch's randomness is derived from it, so resumed runs match")
    resolution: int = arg(512, "image size in pixels (SD at 512, as in the papers)")
    num_steps: int = arg(50, "DDIM steps T (PRDP setup: 50)")
    eta: float = arg(1.0, "DDIM stochasticity, in (0, 1] (PRDP setup: 1.0, DDPM sampling)")
    guidance_scale: float = arg(5.0, "classifier-free guidance w, at sampling and training (PRDP setup: 5.0)")
    sample_batch_size: int = arg(16, "images per sampling batch (PRDP Table 4: B = 16 images of a prompt)")
    sample_batches_per_epoch: int = arg(32, "sampling batches per epoch (Table 4: N = 32 prompts, 16 images each)")
    train_batch_size: int = arg(16, "images per training batch, whole prompts only (Table 4: B = 16)")
    gradient_accumulation_steps: int = arg(32, "training batches per gradient step: 32 x 16 = every image of the "
                                           "epoch in each of the K steps (our reading of Table 4's N, B, K)")
    learning_rate: float = arg(1e-5, "AdamW learning rate (PRDP Table 4 small scale: 1e-5)")
    weight_decay: float = arg(1e-4, "AdamW weight decay (PRDP setup: 1e-4)")
    max_grad_norm: float = arg(1.0, "gradient-norm clip (PRDP setup: 1.0)")
    lora_rank: int = arg(0, "LoRA rank on the layers of --lora-targets; 0 trains the whole UNet, with a frozen "
                         "copy as the reference (PRDP setup: full fine-tuning)")
    lora_targets: str = arg("attention", "the layers LoRA adapts: attention = every attention projection "
                            "(reference), cross-attention = only those that read the prompt (attn2)",
                            choices=["attention", "cross-attention"])
    mixed_precision: str = arg("auto", "UNet compute dtype; auto = fp16 on CUDA (reference), no on CPU",
                               choices=["auto", "no", "fp16", "bf16"])
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    resume: str = arg(None, "continue the run in this output directory from its last finished epoch")
    # --- PRDP's own ---
    beta: float = arg(3e-5, "KL weight: targets are reward differences / beta, on the per-element-mean, "
                      "mean-over-steps scale (PRDP Table 4 small scale: 3e-5; were the paper's log-densities "
                      "summed over SD's 16384 latent elements, the same setting would be 0.49 here)")
    clip_eps: float = arg(1e-6, "proximal clip: each step's log-ratio stays within eps of the old policy's, on the "
                          "per-element-mean scale (PRDP Table 4 small scale: 1e-6; 6e-11 here if the paper summed "
                          "over 16384 latent elements)")
    images_per_prompt: int = arg(16, "images of each prompt, all pairs of which are compared (PRDP Table 4: B = 16)")
    grad_steps_per_epoch: int = arg(10, "gradient steps K on each epoch's samples (PRDP Table 4 small scale: 10)")
    shared_noise: bool = arg(False, "the images of a prompt start from one x_T, as D3PO's pairs do (the PRDP paper "
                             "does not say how its B images are drawn; by default each has its own)")


# Defaults for the shapes-world toy model (--model toy; flags you give still win), found by the runs described
# in README.md ("Learning on a laptop"). The reward is shapes_correct, the share of the prompt's colour, shape and
# size drawn right, sampled without guidance (w = 1, one UNet pass a step), where the model draws the named
# colour only 60% of the time: that is the headroom. LoRA rank 8 sits on the cross-attention only, so only the
# layers that read the prompt change; full fine-tuning learnt what pleases the reward whatever the prompt says
# and lost alignment. An epoch is 8 prompts x 8 images (28 pairs per prompt) and K = 1 gradient step on all 64:
# smaller steps (16 images each) were too noisy, and with K = 1 the proximal clip never acts. The targets
# (r_a - r_b) / beta are far beyond the log-ratio differences reached in 10 minutes, so the loss acts as a policy
# gradient with each prompt's mean reward as its baseline, scaled by 1 / beta. beta = 16 makes that gradient
# about as large as D3PO's (6e-5 in norm), where AdamW's eps (1e-8) holds back the parameters whose gradients
# are tinier still; with beta = 0.1 (160 times larger) every parameter moved at the full rate, and the three
# seeds spread from -1.7 to +2.2 points instead of +0.3 to +1.8.
PRESETS = {"toy": dict(
    prompt_file="tutorials/shapes.txt", reward="shapes_correct", num_epochs=60, resolution=32, num_steps=10,
    guidance_scale=1.0, sample_batch_size=32, sample_batches_per_epoch=2, train_batch_size=16,
    gradient_accumulation_steps=4, learning_rate=3e-3, lora_rank=8, lora_targets="cross-attention", beta=16.0,
    clip_eps=0.1, images_per_prompt=8, grad_steps_per_epoch=1)}


# ALGO LOGIC: every unordered pair of a prompt's images whose rewards differ
def prompt_pairs(rewards, images_per_prompt):
    """rewards (n,) of n images in groups of images_per_prompt consecutive images of one prompt -> (m, 2)."""
    i, j = torch.triu_indices(images_per_prompt, images_per_prompt, offset=1)
    starts = torch.arange(0, len(rewards), images_per_prompt)[:, None]
    pairs = torch.stack([(starts + i).flatten(), (starts + j).flatten()], 1)
    return pairs[rewards[pairs[:, 0]] != rewards[pairs[:, 1]]]


def images_of(groups, images_per_prompt):
    """The image indices of the given prompts (groups of images_per_prompt consecutive images)."""
    return (images_per_prompt * torch.as_tensor(groups, dtype=torch.long)[:, None]
            + torch.arange(images_per_prompt)).flatten()


# ALGO LOGIC: the PRDP loss over pairs, from per-step log-ratios
def rdp_loss(log_ratio, old_log_ratio, rewards, pairs, beta, clip_eps):
    """Returns (loss, info) for per-step log-ratios log pi_theta / pi_ref (n, T) of n images, the same under the
    sampling policy theta_old (n, T), their rewards (n,) and pairs (m, 2) of image indices.

    r_hat = mean_t log-ratio_t (trajectory log-ratio, appendix code); r_hat_clip likewise from the clipped steps
    (Eqs. 16-21); loss = mean over pairs of max( (r_hat_a - r_hat_b - (r_a - r_b)/beta)^2, the same clipped ).
    """
    clipped = old_log_ratio + (log_ratio - old_log_ratio).clamp(-clip_eps, clip_eps)
    r_hat, r_hat_clip = log_ratio.mean(1), clipped.mean(1)
    a, b = pairs[:, 0], pairs[:, 1]
    target = (rewards[a] - rewards[b]) / beta
    loss = torch.maximum((r_hat[a] - r_hat[b] - target) ** 2, (r_hat_clip[a] - r_hat_clip[b] - target) ** 2).mean()
    sign = torch.sign(rewards[a] - rewards[b])  # report both differences with the better image first
    info = {"predicted_diff": (beta * sign * (r_hat[a] - r_hat[b])).mean().detach(),
            "actual_diff": (sign * (rewards[a] - rewards[b])).mean(),
            "clipfrac": ((log_ratio - old_log_ratio).abs() > clip_eps).float().mean().detach()}
    return loss, info


def check_args(args):
    common.check_args(args)
    if args.images_per_prompt < 2 or args.train_batch_size % args.images_per_prompt:
        raise common.UserError(f"--train-batch-size {args.train_batch_size} must hold whole prompts of "
                               f"--images-per-prompt {args.images_per_prompt} images (at least 2).")
    if (args.sample_batch_size * args.sample_batches_per_epoch) % args.images_per_prompt:
        raise common.UserError(f"the {args.sample_batch_size * args.sample_batches_per_epoch} images per epoch are "
                               f"not whole prompts of --images-per-prompt {args.images_per_prompt}.")
    if args.beta <= 0 or args.clip_eps <= 0 or args.grad_steps_per_epoch < 1:
        raise common.UserError(f"--beta and --clip-eps must be positive and --grad-steps-per-epoch at least 1 "
                               f"(got {args.beta}, {args.clip_eps}, {args.grad_steps_per_epoch}).")


def main(argv=None):
    args = common.parse_args(Args, argv, description=__doc__, presets=PRESETS)
    check_args(args)
    prompts = common.load_prompts(args.prompt_file)
    reward_fn = common.get_reward_fn(args.reward)
    pipe, params, autocast = common.load_pipeline(args.model, args.device, args.mixed_precision, args.lora_rank,
                                                  args.resolution, args.seed, reference=True,
                                                  lora_targets=args.lora_targets)
    optimizer = common.make_optimizer(params, args.learning_rate, args.weight_decay)
    scaler = common.make_scaler(args.device, args.mixed_precision)
    start_epoch, extra = common.load_checkpoint(pipe, optimizer, scaler, args.output_dir) if args.resume else (0, {})
    common.start_output(args, start_epoch)
    negative_embeds = common.encode_prompts(pipe, [""])
    B = args.images_per_prompt

    for epoch in tqdm(range(start_epoch, args.num_epochs), desc="epochs", initial=start_epoch, total=args.num_epochs):
        generator = common.epoch_generator(args.seed, epoch)
        # ---- 1. sample B images for each of N prompts with the current policy, which is pi_old for this epoch ----
        pipe.unet.eval()
        with common.Timer() as sample_timer:
            batch_prompts, samples = common.sample_epoch(pipe, args, prompts, negative_embeds, generator, autocast,
                                                         images_per_prompt=B, shared_noise=args.shared_noise)
            rewards = common.compute_rewards(reward_fn, samples.images, batch_prompts)
            rewards_t = torch.as_tensor(rewards, device=pipe.device, dtype=torch.float32)
            # ---- 2. ALGO LOGIC: the pairs; a prompt whose B images all scored the same has none and is dropped ----
            epoch_pairs = prompt_pairs(rewards_t, B)
            trained = torch.unique(epoch_pairs[:, 0].cpu() // B).tolist()  # the prompts (groups of B images) to train
            # log pi_ref does not depend on theta: once per epoch, with the reference model, never per step
            ref_log_probs = common.reference_log_probs(pipe, samples, negative_embeds, args, autocast,
                                                       images_of(trained, B))
        old_log_ratio = samples.log_probs - ref_log_probs  # per-step log-ratios of the sampling policy theta_old

        # ---- 3. ALGO LOGIC: K proximal gradient steps, each on up to accumulation batches of whole prompts ----
        pipe.unet.train()
        info = {"loss": [], "predicted_diff": [], "actual_diff": [], "clipfrac": []}
        T = samples.log_probs.shape[1]
        per_batch = args.train_batch_size // B  # prompts per training batch
        per_step = min(args.gradient_accumulation_steps * per_batch, len(trained))  # prompts per gradient step
        passes = -(-args.grad_steps_per_epoch * per_step // len(trained)) if trained else 0
        order = [trained[i] for _ in range(passes) for i in torch.randperm(len(trained), generator=generator).tolist()]
        with common.Timer() as train_timer:
            for k in range(args.grad_steps_per_epoch if trained else 0):
                step_prompts = order[k * per_step:(k + 1) * per_step]
                batches = [step_prompts[i:i + per_batch] for i in range(0, per_step, per_batch)]
                for batch in batches:
                    idx = images_of(batch, B).to(pipe.device)
                    pairs = prompt_pairs(rewards_t[idx], B)
                    # the loss compares whole trajectories, but backpropagating through all T UNet calls at once
                    # would hold T graphs in memory. So: (a) every step's log-prob without a graph (at theta_old,
                    # in the first gradient step, they are the sampled ones), the loss and its gradient with
                    # respect to those log-probs; (b) each step again with a graph, backpropagating that gradient.
                    # By the chain rule this is exactly the gradient of the loss.
                    if k == 0:
                        log_probs = samples.log_probs[idx].clone()
                    else:
                        with torch.no_grad():
                            log_probs = torch.stack([common.recompute_log_probs(
                                pipe, samples.latents[idx, s], samples.latents[idx, s + 1], samples.timesteps[s],
                                samples.prompt_embeds[idx], negative_embeds, args.guidance_scale, args.eta, autocast)
                                for s in range(T)], 1)
                    log_probs.requires_grad_(True)
                    loss, step_info = rdp_loss(log_probs - ref_log_probs[idx], old_log_ratio[idx], rewards_t[idx],
                                               pairs, args.beta, args.clip_eps)
                    scaler.scale(loss / len(batches)).backward()  # the mean over the step's batches
                    for s in range(T):
                        step_log_probs = common.recompute_log_probs(
                            pipe, samples.latents[idx, s], samples.latents[idx, s + 1], samples.timesteps[s],
                            samples.prompt_embeds[idx], negative_embeds, args.guidance_scale, args.eta, autocast)
                        step_log_probs.backward(log_probs.grad[:, s])
                    for key, v in (("loss", loss), *step_info.items()):
                        info[key].append(v.item())
                common.optimizer_step(optimizer, scaler, params, args.max_grad_norm)

        # ---- 4. log, show, save ----
        metrics = {"epoch": epoch, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                   **{k: float(np.mean(v)) if v else float("nan") for k, v in info.items()},
                   "pairs": len(epoch_pairs), "trained_prompts": len(trained),
                   "sample_seconds": sample_timer.seconds, "train_seconds": train_timer.seconds,
                   "seconds": sample_timer.seconds + train_timer.seconds}
        common.end_epoch(pipe, optimizer, scaler, args, epoch, metrics, samples.images, batch_prompts, rewards,
                         extra={})
    common.finish(args)


if __name__ == "__main__":
    common.run_main(main)
