"""D3PO: Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model (Yang et al., arXiv 2311.13231).

Denoising is a decision process whose policy pi_theta(x_{t-1} | x_t, c) is one stochastic DDIM step (common.py).
Two trajectories of a prompt start from the SAME x_T; someone (or a reward) says which final image is better, and
DPO trains every step t of the pair, winner w against loser l, with pi_ref the model at the start of the run:
  loss_t = -log sigmoid( beta log pi_theta/pi_ref (x^w_{t-1} | x^w_t) - beta log pi_theta/pi_ref (x^l_{t-1} | x^l_t) )
Lines that are the algorithm's own are marked ALGO LOGIC; `diff ddpo.py d3po.py` and `diff ddpo.py prdp.py` show
them.
"""
import math
from dataclasses import dataclass

import plumbing  # noqa: F401 (first: Ctrl-C while torch loads ends in one line, plumbing/__init__.py)
import torch
from tqdm.auto import tqdm

import common
from plumbing import bookkeeping, distributed, human_feedback
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
                      "(several comma-separated: Pareto dominance; D3PO reward experiments: compressibility)")
    output_dir: str = arg("runs/d3po", "where config, metrics, image grids, weights and checkpoint are written")
    num_epochs: int = arg(400, "epochs of sample-then-train (D3PO reference code: 400; with --labels, passes)")
    seed: int = arg(0, "random seed; each epoch's randomness is derived from it, so resumed runs match")
    resolution: int = arg(512, "image size in pixels, a multiple of 8 (SD v1.5 at 512, as in the papers)")
    num_steps: int = arg(20, "DDIM steps T (D3PO reference code: 20)")
    eta: float = arg(1.0, "DDIM stochasticity, in (0, 1] (the papers: 1.0, the DDPM posterior variance)")
    noise_level: float = arg(0.7, "a flow model's (SD3) step noise a, sigma_t = a sqrt(t / (1 - t)) (Flow-GRPO "
                             "paper: 0.7)", within="(0, inf)")
    max_sequence_length: int = arg(256, "a flow model's (SD3) T5 prompt tokens, zeros without T5 (diffusers' SD3 "
                                   "pipeline: 256; Flow-GRPO paper's code: 128)", within="[1, inf)")
    guidance_scale: float = arg(5.0, "classifier-free guidance w, at sampling and training (the papers: 5.0)")
    sample_batch_size: int = arg(20, "images per sampling batch (D3PO reference code: 10 pairs per GPU)")
    sample_batches_per_epoch: int = arg(2, "sampling batches per epoch (D3PO reference code: 2)")
    train_batch_size: int = arg(2, "images per training batch (D3PO reference code: 1 pair)")
    gradient_accumulation_steps: int = arg(1, "training batches per optimiser step (D3PO: one step a pair)")
    learning_rate: float = arg(3e-5, "AdamW learning rate (D3PO reference code: 3e-5)")
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
    # --- D3PO's own ---
    beta: float = arg(0.1, "DPO's beta, on per-element mean log-probs (D3PO reference code: 0.1)", within="(0, inf)")
    ratio_clip: float = arg(0.1, "pi_theta/pi_ref clamped to [1 - eps, 1 + eps] (D3PO reference code: 0.1)",
                            within="(0, 1)")
    sample_only: bool = arg(False, "human feedback: sample a round for people to score, and stop (D3PO: 7 images)")
    images_per_prompt: int = arg(7, "with --sample-only: images of a prompt, from one x_T (D3PO: 7)", within="[2, inf)")
    labels: str = arg(None, "human feedback: train on this round, scored in its labels/ (a --sample-only dir)")
    start_from: str = arg(None, "a finished run whose weights start AND are the reference (the next round)")
    shared_noise: bool = arg(True, "a pair's two images start from one x_T (D3PO); --no-shared-noise draws each its "
                             "own, to measure what the shared start is worth (benchmarks/claims.py)")


# Defaults for the shapes-world toy model (--model toy; flags you give still win); docs/shapes_world.md, "Learning on a
# laptop", says how they were found and what else was tried.
PRESETS = {"toy": dict(
    prompt_file="tutorials/shapes.txt", reward="shape_area", num_epochs=30, resolution=32, num_steps=10,
    guidance_scale=1.0, sample_batch_size=32, sample_batches_per_epoch=2, train_batch_size=32,
    gradient_accumulation_steps=2, learning_rate=3e-4, lora_rank=0)}
# the same world learned as a flow (docs/flow.md; the README's flow commands give DDPO and PRDP tighter clips)
PRESETS["flow-toy"] = dict(PRESETS["toy"], max_sequence_length=8)


# ALGO LOGIC: which image of each pair is preferred, by Pareto dominance over k rewards (or people's mean scores)
def preferences(rewards, pairs):
    """rewards (n, k) of n images, pairs (m, 2) of image indices -> the decided pairs, the winner first. Ties, and
    pairs where neither image is at least as good under every reward, train nothing and are left out."""
    a, b = torch.as_tensor(rewards)[pairs[:, 0]], torch.as_tensor(rewards)[pairs[:, 1]]                # (m, k)
    a_wins, b_wins = (a >= b).all(1) & (a > b).any(1), (b >= a).all(1) & (b > a).any(1)
    return torch.where(b_wins[:, None], pairs.flip(1), pairs)[a_wins | b_wins]                 # the winner first


# ALGO LOGIC: what an epoch logs, beside the rewards and times (docs/outputs.md says what each means)
METRICS = ("loss", "accuracy", "clipfrac", "pairs")


# ALGO LOGIC: the D3PO loss of one denoising step for a batch of pairs
def d3po_loss(log_probs, ref_log_probs, beta, ratio_clip):
    """log_probs (b, 2) of one step of b pairs, the winner first, under pi_theta; ref_log_probs (b, 2) under pi_ref."""
    log_ratio = log_probs - ref_log_probs                                              # log pi_theta / pi_ref, (b, 2)
    # reference code: the ratio clamped to [1 - eps, 1 + eps] before the log (outside it the gradient is zero); here
    # its log clamped to [log(1 - eps), log(1 + eps)]: the same values and gradients, and no overflow of exp above 88
    log_ratio_w, log_ratio_l = log_ratio.clamp(math.log1p(-ratio_clip), math.log1p(ratio_clip)).unbind(1)
    logits = beta * (log_ratio_w - log_ratio_l)                      # D3PO loss (docs/papers.md), as the reference code
    loss = -torch.nn.functional.logsigmoid(logits).mean()            # D3PO loss (docs/papers.md), as the reference code
    info = {"accuracy": (log_ratio[:, 0] > log_ratio[:, 1]).float().mean(),  # the unclamped ratios rank w first
            "clipfrac": ((torch.exp(log_ratio) - 1.0).abs() > ratio_clip).float().mean()}
    return loss, info


# ALGO LOGIC: the algorithm's own checks of its settings, before any model is loaded
def check_args(args):
    bookkeeping.check_args(args, group=2)  # images come in pairs
    if args.sample_only and args.labels:
        raise common.UserError("--sample-only and --labels are two halves of a round: give one of them.")
    if args.labels:  # the round's own settings replace the flags (human_feedback.ROUND_SETTINGS)
        human_feedback.adopt_round_settings(args)


def main(argv=None):
    args = bookkeeping.parse_args(Args, argv, description=__doc__, presets=PRESETS)
    check_args(args)
    prompts = bookkeeping.load_prompts(args.prompt_file)
    reward_fns = [get_reward_fn(name) for name in args.reward.split(",")]  # ALGO LOGIC: several, Pareto dominance
    policy, params = common.load_policy(args, reference=True)  # ALGO LOGIC: and pi_ref
    bookkeeping.say_long_prompts(policy.pipe.tokenizer, prompts)  # cut to the text encoder's window
    if args.sample_only:  # ALGO LOGIC: human feedback, 1: a round of images for people to score (2), then --labels (3)
        return human_feedback.sample_round(policy, args, prompts)
    optimizer = common.make_optimizer(params, args.learning_rate, args.weight_decay)
    scaler = common.make_scaler(args.device, args.mixed_precision)
    resumed = bookkeeping.load_checkpoint(policy.pipe, optimizer, scaler, args.output_dir) if args.resume else None
    start_epoch, extra = resumed or (0, {})
    bookkeeping.start_output(args, start_epoch)
    if args.labels:  # ALGO LOGIC: human feedback, 3: the scored round's pairs, the same ones every epoch
        prompts, labelled, scores, prompt_pairs, ref_log_probs = human_feedback.load_round(policy, args)
        pairs, batch_prompts, rewards = preferences(scores, prompt_pairs), prompts[:16], None

    for epoch in tqdm(range(start_epoch, args.num_epochs), desc="epochs", initial=start_epoch, total=args.num_epochs):
        generator = bookkeeping.epoch_generator(args.seed, epoch)
        info = {key: [] for key in METRICS}  # the values logged in the epoch
        # ---- 1. ALGO LOGIC: sample images with the current policy (this epoch's pi_old) and score them ----
        policy.pipe.unet.eval()
        with bookkeeping.Timer() as sample_timer:
            if args.labels:
                samples = labelled  # the round's trajectories, trained on every epoch
            else:
                batch_prompts, samples = distributed.sample_epoch(policy, args, prompts, generator, images_per_prompt=2,
                                                                  shared_noise=args.shared_noise)  # from one x_T
                rewards = torch.stack([compute_rewards(fn, samples.images, batch_prompts, epoch)
                                       for fn in reward_fns], 1)
                # ---- 2. ALGO LOGIC: what to learn from the rewards: the winner of each pair; ties are dropped ----
                pairs = preferences(rewards, torch.arange(len(rewards)).view(-1, 2))        # (n, 2), winner first
                # log pi_ref does not depend on theta: once per trained image, never in the training loop
                ref_log_probs = distributed.reference_log_probs(policy, samples, args.sample_batch_size, pairs)
            order = pairs[torch.randperm(len(pairs), generator=generator)].flatten()  # images: winner, loser, ...
            trained_steps = args.num_steps  # every denoising step of the pair
            bookkeeping.log_info(info, pairs=len(pairs))
            step_size = args.train_batch_size * args.gradient_accumulation_steps  # images an optimiser step

        # ---- 3. ALGO LOGIC: train every denoising step of every pair, winner and loser at the same step ----
        policy.pipe.unet.train()
        with bookkeeping.Timer() as train_timer:
            for step_batches in common.minibatches(order.to(args.device), args.train_batch_size, step_size):
                # the winner and the loser of a pair at the same step, the steps in a random order
                orders = [torch.randperm(args.num_steps, generator=generator).to(idx.device).expand(len(idx), -1)
                          for idx in step_batches]                                           # (2b, T)
                for idx, steps in distributed.share(zip(step_batches, orders)):  # torchrun: this process's (one: all)
                    for j in range(trained_steps):
                        s = steps[:, j]                                                      # (2b,) a step each
                        log_probs = common.log_prob(policy, samples, idx, s).view(-1, 2)     # log pi_theta, (b, 2)
                        loss, step_info = d3po_loss(log_probs, ref_log_probs[idx, s].view(-1, 2), args.beta,
                                                    args.ratio_clip)
                        scaler.scale(loss / (trained_steps * len(step_batches))).backward()  # mean of the step
                        bookkeeping.log_info(info, loss=loss, **step_info)
                norm = distributed.optimizer_step(optimizer, scaler, params, args.max_grad_norm)  # before clipping
                bookkeeping.log_info(info, grad_norm=norm)

        # ---- 4. log, show, save ----
        metrics = bookkeeping.epoch_metrics(epoch, rewards, info, sample_timer, train_timer, args.reward)
        if args.labels:  # ALGO LOGIC: show what the model draws now, on fixed noise, for the round's first prompts
            samples.images = common.evaluate(policy, batch_prompts, args.seed)
        bookkeeping.end_epoch(policy.pipe, optimizer, scaler, args, epoch, metrics, samples.images, batch_prompts,
                              rewards, extra)
        del samples  # this epoch's trajectories are not kept (on the GPU) through the next epoch's sampling
    bookkeeping.finish(args)


if __name__ == "__main__":
    bookkeeping.run_main(main)
