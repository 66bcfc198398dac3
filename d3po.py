"""D3PO: Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model (Yang et al., arXiv 2311.13231).

Denoising is a T-step decision process: the state is (c, t, x_t), the action x_{t-1}, and the policy
pi_theta(x_{t-1} | x_t, c) is one guided stochastic DDIM step (common.ddim_step_with_logprob). D3PO needs no
reward model: two trajectories of a prompt start from the SAME x_T and differ because sampling is stochastic;
someone says which final image is better, and DPO is applied to every denoising step of the pair:

  loss_t = -log sigmoid( beta * log pi_theta(a^w_t | s^w_t) / pi_ref(a^w_t | s^w_t)
                        - beta * log pi_theta(a^l_t | s^l_t) / pi_ref(a^l_t | s^l_t) )

(w the winner, l the loser, pi_ref the model at the start of the run). The preference comes online from a
reward (the paper's compressibility and aesthetic experiments) or from people in rounds (--sample-only, then
--labels). From the reference code, not the paper's equations: the ratio pi_theta / pi_ref is clamped to
[1 - eps, 1 + eps] before the log, beta = 0.1, log-probs are MEANS over latent elements. Everything else is in
common.py; the lines that are D3PO's own are marked "ALGO LOGIC".
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import common
from common import arg


@dataclass
class Args:
    # --- shared by ddpo.py, d3po.py and prdp.py ---
    model: str = arg("stable-diffusion-v1-5/stable-diffusion-v1-5",
                     "hub id or local diffusers directory (D3PO reference code: SD v1.5)")
    prompt_file: str = arg("animals.txt", "prompts, one a line; '#' comments (D3PO: DDPO's animal prompts)")
    reward: str = arg("jpeg_compressibility", "reward(s) the online preferences come from; name or module:function, "
                      "comma-separated for several (Pareto dominance) (D3PO reward experiments: compressibility)")
    output_dir: str = arg("runs/d3po", "where config, metrics, image grids, LoRA and checkpoint are written")
    num_epochs: int = arg(400, "epochs of sample-then-train; with --labels, passes over the labelled pairs "
                          "(D3PO reference code: 400)")
    seed: int = arg(0, "random seed; each epoch's randomness is derived from it, so resumed runs match")
    resolution: int = arg(512, "image size in pixels (SD v1.5 at 512, as in the papers)")
    num_steps: int = arg(20, "DDIM steps T (D3PO reference code: 20)")
    eta: float = arg(1.0, "DDIM stochasticity, in (0, 1]; the pair's images differ only through it (reference: 1.0)")
    guidance_scale: float = arg(5.0, "classifier-free guidance w, at sampling and training (reference: 5.0)")
    sample_batch_size: int = arg(20, "images per sampling batch, two per prompt (D3PO reference code: 10 prompts "
                                 "per GPU)")
    sample_batches_per_epoch: int = arg(2, "sampling batches per epoch (D3PO reference code: 2)")
    train_batch_size: int = arg(2, "images per training batch, two per pair (D3PO reference code: 1 pair)")
    gradient_accumulation_steps: int = arg(1, "training batches per optimiser step (D3PO: one optimiser step per "
                                           "pair, accumulated over its denoising steps)")
    learning_rate: float = arg(3e-5, "AdamW learning rate (D3PO reference code: 3e-5)")
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
    # --- D3PO's own ---
    beta: float = arg(0.1, "beta of the DPO loss, on per-element mean log-probs (D3PO reference code: 0.1)")
    ratio_clip: float = arg(0.1, "pi_theta/pi_ref is clamped to [1 - eps, 1 + eps] (D3PO reference code: 0.1)")
    sample_only: bool = arg(False, "human feedback: sample a round for people to score into --output-dir, and stop "
                            "(D3PO human-feedback experiments)")
    images_per_prompt: int = arg(7, "with --sample-only: images of each prompt, from one initial noise (D3PO: 7)")
    labels: str = arg(None, "human feedback: train on this scored round (a --sample-only directory with label "
                      "files in its labels/)")
    start_from: str = arg(None, "a previous run or round's training directory: its weights are the starting AND "
                          "reference model (the next round of human feedback)")


# Defaults for the shapes-world toy model (--model toy; flags you give still win), found by the runs described in
# README.md ("Learning on a laptop"). Preferences come from shapes_correct, the share of the prompt's colour, shape
# and size drawn right: a coarse score, so near-identical images tie (and train nothing), as a labeller would call
# them. Sampling is without guidance (w = 1, one UNet pass a step), where the model draws the named colour only 60%
# of the time: that is the headroom. LoRA rank 8 sits on the cross-attention only, so only the layers that read
# the prompt change; full fine-tuning or LoRA everywhere learnt what pleases the reward whatever the prompt says
# (bigger shapes) and lost alignment. Each epoch's 32 pairs make one optimiser step, as in the other presets
# (four steps of 8 pairs an epoch learnt faster at first, then wandered: README.md gives the numbers).
PRESETS = {"toy": dict(
    prompt_file="tutorials/shapes.txt", reward="shapes_correct", num_epochs=110, resolution=32, num_steps=10,
    guidance_scale=1.0, sample_batch_size=32, sample_batches_per_epoch=2, train_batch_size=16,
    gradient_accumulation_steps=4, learning_rate=3e-3, lora_rank=8, lora_targets="cross-attention")}


# ALGO LOGIC: which image of a pair wins
def preferences(rewards):
    """rewards (n, k) of n images in pairs (0, 1), (2, 3), ... under k rewards -> prefer (n/2,): +1 if the first
    image of the pair Pareto-dominates the second (at least as good under every reward, better under one), -1 if
    it is dominated, 0 for a tie or when neither dominates (such pairs train nothing)."""
    first, second = rewards[0::2], rewards[1::2]
    first_wins = (first >= second).all(1) & (first > second).any(1)
    second_wins = (second >= first).all(1) & (second > first).any(1)
    return first_wins.astype(np.int64) - second_wins.astype(np.int64)


# ALGO LOGIC: the D3PO loss of one denoising step for a batch of pairs
def d3po_loss(log_probs, ref_log_probs, prefer, beta, ratio_clip):
    """Returns (loss, accuracy, clipfrac) for log-probs (b, 2) of one step of both images of b pairs under
    pi_theta and pi_ref, and prefer (b,) = +1 if the first image won, -1 if the second, 0 for a tie.

    loss = mean( -log sigmoid( beta * prefer * (log clamp(ratio_1) - log clamp(ratio_2)) ) ),
    ratio = pi_theta / pi_ref clamped to [1 - eps, 1 + eps] (reference code; outside it the gradient is zero).
    A tie makes the logit 0 whatever theta is: a constant loss of log 2 and no gradient.
    """
    log_ratio = log_probs - ref_log_probs
    clamped = torch.log(torch.exp(log_ratio).clamp(1.0 - ratio_clip, 1.0 + ratio_clip))
    prefer = prefer.to(log_ratio.dtype)
    loss = -F.logsigmoid(beta * prefer * (clamped[:, 0] - clamped[:, 1])).mean()
    # implicit accuracy: the unclamped log-ratios already rank the winner first
    decided = prefer != 0
    accuracy = (prefer * (log_ratio[:, 0] - log_ratio[:, 1]) > 0)[decided].float().mean()
    clipfrac = ((torch.exp(log_ratio) - 1.0).abs() > ratio_clip).float().mean()
    return loss, accuracy.detach(), clipfrac.detach()


# ---- human feedback: a round of samples for people to score, and the label files they return ----
LABEL_HELP = ("a JSON list with one entry per prompt, in the order of the template: {\"prompt\": ..., "
              "\"scores\": [one number per image, higher is better]}")


def sample_round(pipe, args, prompts, autocast):
    """--sample-only: every prompt of the file, images_per_prompt times from one x_T; writes the trajectories,
    a numbered contact sheet per prompt and labels_template.json, then stops."""
    if os.path.isfile(os.path.join(args.output_dir, "trajectories.safetensors")):
        raise common.UserError(f"{args.output_dir!r} already holds a sampled round; choose another --output-dir.")
    os.makedirs(os.path.join(args.output_dir, "sheets"), exist_ok=True)
    common.write_config(args)
    K, negative_embeds = args.images_per_prompt, common.encode_prompts(pipe, [""])
    _, samples = common.sample_epoch(pipe, args, prompts, negative_embeds, common.epoch_generator(args.seed, 0),
                                     autocast, images_per_prompt=K, shared_noise=True, draw=False)
    template = []
    for p, prompt in enumerate(prompts):
        sheet = os.path.join("sheets", f"{p:04d}.png")
        common.save_grid(samples.images[p * K:(p + 1) * K], [f"#{k}" for k in range(K)],
                         os.path.join(args.output_dir, sheet), columns=K, scale=max(1, 128 // args.resolution))
        template.append({"prompt": prompt, "sheet": sheet, "scores": [None] * K})
    tensors = {"latents": samples.latents, "log_probs": samples.log_probs, "timesteps": samples.timesteps,
               "images": samples.images}
    common.atomic_write(os.path.join(args.output_dir, "trajectories.safetensors"),
                        lambda p: save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, p))
    common.atomic_write(os.path.join(args.output_dir, "labels_template.json"),
                        lambda p: open(p, "w").write(json.dumps(template, indent=1) + "\n"))
    print(f"sampled {len(prompts)} prompts x {K} images into {args.output_dir}: look at sheets/, copy "
          f"labels_template.json to labels/<your name>.json and fill in the scores (higher is better)", flush=True)


def read_labels(round_dir, prompts, images_per_prompt):
    """Mean score of every image over the label files in round_dir/labels/ (one per annotator): (P, K)."""
    label_dir = os.path.join(round_dir, "labels")
    files = sorted(f for f in os.listdir(label_dir) if f.endswith(".json")) if os.path.isdir(label_dir) else []
    if not files:
        raise common.UserError(f"--labels {round_dir!r}: no label files in {label_dir}/ (copy labels_template.json "
                               f"there as <name>.json and fill in the scores).")
    scores = []
    for name in files:
        where = os.path.join(label_dir, name)
        try:
            with open(where) as f:
                entries = json.load(f)
        except json.JSONDecodeError as e:
            raise common.UserError(f"{where} is not valid JSON (line {e.lineno}); it must be {LABEL_HELP}.")
        if not isinstance(entries, list) or len(entries) != len(prompts):
            n = len(entries) if isinstance(entries, list) else "no list of"
            raise common.UserError(f"{where} has {n} prompts but the round has {len(prompts)}; it must be {LABEL_HELP}.")
        for p, (entry, prompt) in enumerate(zip(entries, prompts)):
            if not isinstance(entry, dict) or not isinstance(entry.get("scores"), list):
                raise common.UserError(f"{where}, prompt {p}: the entry has no \"scores\" list; it must be {LABEL_HELP}.")
            if entry.get("prompt", prompt) != prompt:
                raise common.UserError(f"{where}, prompt {p}: {entry['prompt']!r} is not the round's {prompt!r}.")
            if len(entry["scores"]) != images_per_prompt:
                raise common.UserError(f"{where}, prompt {p} ({prompt!r}): {len(entry['scores'])} scores for "
                                       f"{images_per_prompt} images.")
            for k, s in enumerate(entry["scores"]):
                if isinstance(s, bool) or not isinstance(s, (int, float)) or not np.isfinite(s):
                    raise common.UserError(f"{where}, prompt {p} ({prompt!r}), image #{k}: score {s!r} is not a number.")
        scores.append([entry["scores"] for entry in entries])
    return np.mean(np.array(scores, dtype=np.float64), axis=0)


# the settings that define a round's trajectories and its reference model; training on it must use them
ROUND_SETTINGS = ("model", "start_from", "resolution", "num_steps", "eta", "guidance_scale", "images_per_prompt")


def adopt_round_settings(args):
    path = os.path.join(args.labels, "config.json")
    if not os.path.isfile(os.path.join(args.labels, "trajectories.safetensors")) or not os.path.isfile(path):
        raise common.UserError(f"--labels {args.labels!r}: no trajectories.safetensors and config.json there, so "
                               f"it is not a round written by --sample-only.")
    with open(path) as f:
        saved = json.load(f)
    changed = [f"--{n.replace('_', '-')} {saved[n]}" for n in ROUND_SETTINGS if getattr(args, n) != saved[n]]
    if changed:
        print(f"training on the round {args.labels} with its own settings: {', '.join(changed)}", flush=True)
    for name in ROUND_SETTINGS:
        setattr(args, name, saved[name])


# ALGO LOGIC: every pair of a prompt's images whose (mean) scores differ
def labelled_pairs(scores):
    """scores (P, K) -> pairs (n, 2) of image indices (prompt p's images are p*K ... p*K+K-1), prefer (n,)."""
    P, K = scores.shape
    pairs, prefer = [], []
    for p in range(P):
        for i in range(K):
            for j in range(i + 1, K):
                if scores[p, i] != scores[p, j]:
                    pairs.append((p * K + i, p * K + j))
                    prefer.append(1 if scores[p, i] > scores[p, j] else -1)
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2), torch.tensor(prefer, dtype=torch.long)


def load_round(pipe, args):
    """The labelled round as Trajectories, its prompts and its pairs. The round was sampled by the model this run
    starts from, which is the reference: the stored log-probs ARE the reference log-probs."""
    with open(os.path.join(args.labels, "labels_template.json")) as f:
        prompts = [entry["prompt"] for entry in json.load(f)]
    scores = read_labels(args.labels, prompts, args.images_per_prompt)
    t = {k: v.to(pipe.device) for k, v in load_file(os.path.join(args.labels, "trajectories.safetensors")).items()}
    batch_prompts = [p for p in prompts for _ in range(args.images_per_prompt)]
    embeds = torch.cat([common.encode_prompts(pipe, batch_prompts[i:i + args.sample_batch_size])
                        for i in range(0, len(batch_prompts), args.sample_batch_size)])
    samples = common.Trajectories(t["images"], t["latents"], t["log_probs"], t["timesteps"], embeds)
    pipe.scheduler.set_timesteps(args.num_steps, device=pipe.device)  # the DDIM step needs the schedule
    pairs, prefer = labelled_pairs(scores)
    print(f"round {args.labels}: {len(prompts)} prompts, {len(pairs)} pairs with different scores", flush=True)
    return prompts, samples, pairs, prefer


def check_args(args):
    common.check_args(args)
    if args.train_batch_size % 2:
        raise common.UserError(f"--train-batch-size {args.train_batch_size} must be even: it holds pairs of images.")
    if (args.sample_batch_size * args.sample_batches_per_epoch) % 2:
        raise common.UserError("--sample-batch-size times --sample-batches-per-epoch must be even: images come in pairs.")
    if args.beta <= 0 or not 0 < args.ratio_clip < 1:
        raise common.UserError(f"--beta must be positive and --ratio-clip in (0, 1) (got {args.beta}, {args.ratio_clip}).")
    if args.images_per_prompt < 2:
        raise common.UserError(f"--images-per-prompt must be at least 2 (got {args.images_per_prompt}).")
    if args.sample_only and args.labels:
        raise common.UserError("--sample-only and --labels are two halves of a round: give one of them.")
    for flag, path in (("--labels", args.labels), ("--start-from", args.start_from)):
        if path and not os.path.isdir(path):
            raise common.UserError(f"{flag} {path!r} is not a directory.")


def main(argv=None):
    args = common.parse_args(Args, argv, description=__doc__, presets=PRESETS)
    check_args(args)
    if args.labels:
        adopt_round_settings(args)
    prompts = common.load_prompts(args.prompt_file) if not args.labels else None
    reward_fns = [common.get_reward_fn(name) for name in args.reward.split(",")]
    pipe, params, autocast = common.load_pipeline(args.model, args.device, args.mixed_precision, args.lora_rank,
                                                  args.resolution, args.seed, args.start_from, reference=True,
                                                  lora_targets=args.lora_targets)
    if args.sample_only:
        return sample_round(pipe, args, prompts, autocast)
    optimizer = common.make_optimizer(params, args.learning_rate, args.weight_decay)
    scaler = common.make_scaler(args.device, args.mixed_precision)
    start_epoch, extra = common.load_checkpoint(pipe, optimizer, scaler, args.output_dir) if args.resume else (0, {})
    common.start_output(args, start_epoch)
    negative_embeds = common.encode_prompts(pipe, [""])
    if args.labels:
        prompts, samples, pairs, prefer = load_round(pipe, args)
        ref_log_probs = samples.log_probs

    for epoch in tqdm(range(start_epoch, args.num_epochs), desc="epochs", initial=start_epoch, total=args.num_epochs):
        generator = common.epoch_generator(args.seed, epoch)
        metrics = {"epoch": epoch}
        # ---- 1. sample pairs with the current policy, two images per prompt from one x_T, and score them ----
        pipe.unet.eval()
        with common.Timer() as sample_timer:
            if not args.labels:
                batch_prompts, samples = common.sample_epoch(pipe, args, prompts, negative_embeds, generator, autocast,
                                                             images_per_prompt=2, shared_noise=True)
                rewards = np.stack([common.compute_rewards(fn, samples.images, batch_prompts) for fn in reward_fns], 1)
                # ---- 2. ALGO LOGIC: preferences from the rewards; ties train nothing, so they are dropped ----
                prefer = torch.as_tensor(preferences(rewards))
                pairs = torch.arange(len(batch_prompts)).view(-1, 2)[prefer != 0]
                prefer = prefer[prefer != 0]
                # log pi_ref does not change during training: once per trained sample, with the adapter off
                ref_log_probs = common.reference_log_probs(pipe, samples, negative_embeds, args, autocast, pairs)
                metrics.update(reward_mean=float(rewards[:, 0].mean()), reward_std=float(rewards[:, 0].std()))
                if len(reward_fns) > 1:
                    metrics.update({f"{n}_mean": float(rewards[:, i].mean())
                                    for i, n in enumerate(args.reward.split(","))})

        # ---- 3. ALGO LOGIC: train every denoising step of every pair, winner and loser at the same step ----
        pipe.unet.train()
        info = {"loss": [], "accuracy": [], "clipfrac": []}
        T, pairs_per_batch = samples.log_probs.shape[1], args.train_batch_size // 2
        with common.Timer() as train_timer:
            order = torch.randperm(len(pairs), generator=generator)
            num_batches = -(-len(pairs) // pairs_per_batch)
            for batch_index in range(num_batches):
                batch = order[batch_index * pairs_per_batch:(batch_index + 1) * pairs_per_batch]
                idx, pref = pairs[batch].flatten().to(pipe.device), prefer[batch].to(pipe.device)  # (2b,) (b,)
                for s in torch.randperm(T, generator=generator).tolist():
                    log_probs = common.recompute_log_probs(
                        pipe, samples.latents[idx, s], samples.latents[idx, s + 1], samples.timesteps[s],
                        samples.prompt_embeds[idx], negative_embeds, args.guidance_scale, args.eta, autocast)
                    loss, accuracy, clipfrac = d3po_loss(log_probs.view(-1, 2), ref_log_probs[idx, s].view(-1, 2),
                                                         pref, args.beta, args.ratio_clip)
                    # average over the pair's steps and the accumulated batches of one optimiser step
                    scaler.scale(loss / (T * args.gradient_accumulation_steps)).backward()
                    for k, v in (("loss", loss), ("accuracy", accuracy), ("clipfrac", clipfrac)):
                        info[k].append(v.item())
                if (batch_index + 1) % args.gradient_accumulation_steps == 0 or batch_index + 1 == num_batches:
                    common.optimizer_step(optimizer, scaler, params, args.max_grad_norm)

        # ---- 4. log, show, save ----
        metrics.update({k: float(np.mean(v)) if v else float("nan") for k, v in info.items()}, pairs=len(pairs),
                       sample_seconds=sample_timer.seconds, train_seconds=train_timer.seconds,
                       seconds=sample_timer.seconds + train_timer.seconds)
        if args.labels:  # show what the model draws now, on fixed noise, for the round's first prompts
            shown = prompts[:16]
            common.end_epoch(pipe, optimizer, scaler, args, epoch, metrics,
                             common.evaluate(pipe, shown, args.seed, args, autocast), shown, None, extra={})
        else:
            common.end_epoch(pipe, optimizer, scaler, args, epoch, metrics, samples.images, batch_prompts,
                             rewards[:, 0], extra={})
    common.finish(args)


if __name__ == "__main__":
    common.run_main(main)
