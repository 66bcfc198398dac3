"""Plumbing shared by ddpo.py, d3po.py and prdp.py.

Nothing here is specific to one algorithm: the stochastic DDIM step and its log-probability (the "policy" of
all three papers), sampling whole trajectories, recomputing log-probs with gradients, loading a Stable
Diffusion pipeline with LoRA, rewards, prompt files, command-line parsing, and writing a run's output.
Notation follows ../shared/PAPERS.md: abar_t is DDPM's cumulative alpha (diffusers' `alphas_cumprod`, which the
DDIM paper calls alpha_t), sigma_t the DDIM step's standard deviation, eta its stochasticity.
"""
import argparse
import copy
import dataclasses
import importlib
import io
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm


PROJECT = os.path.dirname(os.path.abspath(__file__))
TOY_MODEL = os.path.join(PROJECT, "toy_model")  # --model toy


class UserError(Exception):
    """A mistake the user can fix; the scripts print its one sentence and exit, without a traceback."""


def run_main(main):
    """Call `main()`, turning a UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")


# --------------------------------------------------------------------------------------------------------------
# The policy: one stochastic DDIM step and the log-density of its outcome
# --------------------------------------------------------------------------------------------------------------

def ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None, generator=None):
    """One DDIM step x_t -> x_{t-1} with noise (eta > 0) and the log-density of x_{t-1} under it.

    Returns (prev_sample, log_prob): prev_sample (B, C, H, W) in float32, log_prob (B,) the Gaussian log-density
    AVERAGED over latent elements (the reference code's convention; multiply by C*H*W for the sum). If
    prev_sample is given it is scored as it is, so that training can recompute the log-prob of a stored step.
    `timestep` may be a scalar or a (B,) tensor of different timesteps. Computes in float32 whatever the dtype
    of model_output, so the log-probs are the same under fp16, bf16 and fp32 models.
    """
    if not eta > 0:
        raise UserError(f"eta must be > 0 (got {eta}): with eta = 0 DDIM is deterministic and log-probs are undefined.")
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before ddim_step_with_logprob")
    B, device = sample.shape[0], sample.device
    sample = sample.float()
    model_output = model_output.float()

    # the previous timestep of the (leading-spaced) DDIM grid, as in diffusers' DDIMScheduler.step
    t = torch.as_tensor(timestep, device="cpu").long().reshape(-1).expand(B)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.cpu()
    # abar_prev: at the last step prev_t < 0 and abar_prev is the scheduler's final_alpha_cumprod, which is
    # abar_0 (not 1) for Stable Diffusion's set_alpha_to_one = False, so sigma never reaches 0 there.
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=alphas_cumprod.dtype).cpu()
    abar_prev_all = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final)
    abar_t = alphas_cumprod[t].to(device, torch.float32).view(B, 1, 1, 1)
    abar_prev = abar_prev_all.to(device, torch.float32).view(B, 1, 1, 1)

    # x0_hat and eps from the model output (PAPERS.md, shared ground; v_prediction converted first)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        eps = model_output
        x0_hat = (sample - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    elif prediction_type == "v_prediction":
        # v = sqrt(abar) eps - sqrt(1 - abar) x0  =>  x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        x0_hat = abar_t.sqrt() * sample - (1 - abar_t).sqrt() * model_output
        eps = abar_t.sqrt() * model_output + (1 - abar_t).sqrt() * sample
    elif prediction_type == "sample":
        x0_hat = model_output
        eps = (sample - abar_t.sqrt() * x0_hat) / (1 - abar_t).sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    if getattr(scheduler.config, "clip_sample", False):  # False for Stable Diffusion; kept for other models
        r = scheduler.config.clip_sample_range
        x0_hat = x0_hat.clamp(-r, r)

    # var_t = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev);  sigma_t = eta * sqrt(var_t)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * variance.sqrt()
    # mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps   (DDIM Eq. 12)
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std**2).clamp(min=0).sqrt() * eps

    if prev_sample is None:
        # draw on the generator's device (CPU by default) so results do not depend on the GPU
        noise = torch.randn(sample.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else device).to(device)
        prev_sample = mean + std * noise  # x_{t-1} = mean + sigma_t z
    prev_sample = prev_sample.float()

    # log N(x_{t-1}; mean, sigma_t^2) = -(x - mean)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi), per element
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))  # mean over C, H, W -> (B,)
    return prev_sample, log_prob


# --------------------------------------------------------------------------------------------------------------
# Sampling trajectories and recomputing their log-probs
# --------------------------------------------------------------------------------------------------------------

def encode_prompts(pipe, prompts):
    """CLIP text embeddings (B, L, D) of a list of prompts, padded to the tokenizer's length like SD does."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def guided_noise_pred(pipe, latents, timestep, prompt_embeds, negative_embeds, guidance_scale):
    """Classifier-free guidance, eps_uncond + w (eps_cond - eps_uncond), with both halves in ONE UNet call.

    The same function serves sampling and training, so the policy scored in training is exactly the one that
    sampled. `timestep` is a scalar or (B,); `negative_embeds` is (1, L, D), the empty prompt's embedding.
    """
    B = latents.shape[0]
    if guidance_scale == 1.0:
        return pipe.unet(latents, timestep, encoder_hidden_states=prompt_embeds).sample
    t = timestep.repeat(2) if torch.as_tensor(timestep).ndim > 0 else timestep
    embeds = torch.cat([negative_embeds.expand(B, -1, -1), prompt_embeds])
    out = pipe.unet(torch.cat([latents, latents]), t, encoder_hidden_states=embeds).sample
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@dataclass
class Trajectories:
    """What sampling returns; all tensors on the sampling device, latents and log-probs in float32."""
    images: torch.Tensor         # (B, 3, H, W) decoded images in [0, 1]
    latents: torch.Tensor        # (B, T+1, C, h, w) x_T ... x_0
    log_probs: torch.Tensor      # (B, T) log pi(x_{t-1} | x_t, c) of each step, per-element mean
    timesteps: torch.Tensor      # (T,) the scheduler's timesteps, the same for every sample
    prompt_embeds: torch.Tensor  # (B, L, D)


def decode(pipe, latents):
    """VAE-decode latents to float images in [0, 1], (B, 3, H, W)."""
    with torch.no_grad():
        x = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_trajectories(pipe, prompt_embeds, negative_embeds, num_steps, eta, guidance_scale, generator,
                        latents=None, autocast=nullcontext, progress=True):
    """Guided stochastic DDIM from x_T to x_0 for a batch of prompt embeddings, keeping every step.

    `latents` is an optional initial noise x_T (B, C, h, w): D3PO gives two trajectories the same one.
    """
    device, B = prompt_embeds.device, prompt_embeds.shape[0]
    pipe.scheduler.set_timesteps(num_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    if latents is None:
        shape = (B, pipe.unet.config.in_channels, *latent_size(pipe))
        latents = torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)
    latents = latents.to(device, torch.float32) * pipe.scheduler.init_noise_sigma  # 1.0 for DDIM
    all_latents, all_log_probs = [latents], []
    for t in tqdm(timesteps, desc="sampling", leave=False, disable=not progress):
        with autocast():
            noise_pred = guided_noise_pred(pipe, latents, t, prompt_embeds, negative_embeds, guidance_scale)
        latents, log_prob = ddim_step_with_logprob(pipe.scheduler, noise_pred, t, latents, eta, generator=generator)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return Trajectories(images=decode(pipe, latents), latents=torch.stack(all_latents, dim=1),
                        log_probs=torch.stack(all_log_probs, dim=1), timesteps=timesteps,
                        prompt_embeds=prompt_embeds)


def recompute_log_probs(pipe, latents, next_latents, timesteps, prompt_embeds, negative_embeds, guidance_scale,
                        eta, autocast=nullcontext):
    """log pi_theta(next_latents | latents, c) under the CURRENT model, with gradients: (B,).

    latents, next_latents (B, C, h, w) are x_t and x_{t-1} of stored steps; timesteps (B,) may differ per sample.
    """
    with autocast():
        noise_pred = guided_noise_pred(pipe, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale)
    _, log_prob = ddim_step_with_logprob(pipe.scheduler, noise_pred, timesteps, latents, eta, prev_sample=next_latents)
    return log_prob


def sample_epoch(pipe, args, prompts, negative_embeds, generator, autocast, images_per_prompt=1,
                 shared_noise=False, draw=True, progress=True):
    """Sample args.sample_batch_size * args.sample_batches_per_epoch images, in batches of args.sample_batch_size.

    With draw=True the prompts are drawn uniformly at random, one for every `images_per_prompt` images (which
    then sit next to each other); with draw=False every prompt given is sampled `images_per_prompt` times.
    shared_noise=True gives the images of one prompt the same x_T (D3PO's pairs).
    Returns (the prompt of each image, Trajectories of all of them concatenated along the batch)."""
    if draw:
        n_prompts = args.sample_batch_size * args.sample_batches_per_epoch // images_per_prompt
        prompts = [prompts[i] for i in torch.randint(len(prompts), (n_prompts,), generator=generator).tolist()]
    batch_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    noise = None
    if shared_noise:
        shape = (len(prompts), pipe.unet.config.in_channels, *latent_size(pipe))
        noise = torch.randn(shape, generator=generator, device=generator.device).repeat_interleave(images_per_prompt, 0)
    parts = []
    for start in range(0, len(batch_prompts), args.sample_batch_size):
        embeds = encode_prompts(pipe, batch_prompts[start:start + args.sample_batch_size])
        latents = None if noise is None else noise[start:start + args.sample_batch_size]
        parts.append(sample_trajectories(pipe, embeds, negative_embeds, args.num_steps, args.eta, args.guidance_scale,
                                         generator, latents=latents, autocast=autocast, progress=progress))
    return batch_prompts, Trajectories(*(torch.cat([getattr(p, f.name) for p in parts])
                                         if f.name != "timesteps" else parts[0].timesteps
                                         for f in dataclasses.fields(Trajectories)))


@torch.no_grad()
def reference_log_probs(pipe, samples, negative_embeds, args, autocast=nullcontext, rows=None):
    """log pi_ref of every sampled step, (B, T): the reference model's log-probs do not depend on the trained
    parameters, so D3PO and PRDP compute them once per sample, here, and never in the training loop.
    rows: only these samples' (the ones that will be trained on); the other rows are NaN."""
    B, T = samples.log_probs.shape
    out = torch.full_like(samples.log_probs, float("nan"))
    rows = torch.arange(B) if rows is None else torch.as_tensor(rows).flatten().cpu()
    with reference_model(pipe):
        for start in range(0, len(rows), args.sample_batch_size):
            i = rows[start:start + args.sample_batch_size].to(samples.latents.device)
            for s in range(T):
                out[i, s] = recompute_log_probs(pipe, samples.latents[i, s], samples.latents[i, s + 1],
                                                samples.timesteps[s], samples.prompt_embeds[i], negative_embeds,
                                                args.guidance_scale, args.eta, autocast)
    return out


def evaluate(pipe, prompts, seed, args, autocast=nullcontext, batch_size=32):
    """Sample each prompt once with noise from `seed` (keep it apart from training seeds) and return the images.

    Used to compare a model before and after fine-tuning on the same held-apart noise."""
    generator = torch.Generator("cpu").manual_seed(seed)
    negative_embeds = encode_prompts(pipe, [""])
    images = []
    for start in range(0, len(prompts), batch_size):
        embeds = encode_prompts(pipe, prompts[start:start + batch_size])
        images.append(sample_trajectories(pipe, embeds, negative_embeds, args.num_steps, args.eta,
                                          args.guidance_scale, generator, autocast=autocast, progress=False).images)
    return torch.cat(images)


def latent_size(pipe):
    """(h, w) of the latents for the pipeline's configured resolution."""
    size = pipe.resolution // pipe.vae_scale_factor
    return size, size


# --------------------------------------------------------------------------------------------------------------
# Loading the model, LoRA, precision
# --------------------------------------------------------------------------------------------------------------

def resolve_precision(mixed_precision, device):
    """The autocast dtype for 'auto' | 'no' | 'fp16' | 'bf16' (auto: fp16 on CUDA, as the reference; no on CPU)."""
    if mixed_precision == "auto":
        mixed_precision = "fp16" if device.type == "cuda" else "no"
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


# the UNet layers that get LoRA adapters, by --lora-targets (peft's target_modules: a list of name endings, or a
# regex over full module names). attention: every attention projection, as diffusers' LoRA examples do;
# cross-attention: only attn2's, where the prompt enters the UNet, so nothing that does not read the prompt moves.
LORA_TARGETS = {"attention": ["to_q", "to_k", "to_v", "to_out.0"],
                "cross-attention": r".*attn2\.(to_q|to_k|to_v|to_out\.0)"}


def load_pipeline(model, device, mixed_precision="no", lora_rank=4, resolution=None, seed=0, start_from=None,
                  reference=False, lora_targets="attention"):
    """Load a Stable Diffusion pipeline for fine-tuning and return (pipe, trainable_params, autocast).

    VAE and text encoder are frozen (and kept in the half-precision dtype when mixed precision is on). With
    lora_rank > 0, LoRA adapters (peft) on the layers LORA_TARGETS[lora_targets] names are the only trainable
    parameters, kept in float32; lora_rank = 0 trains the whole UNet in float32. `autocast` is a context-manager
    factory for the UNet forward passes.

    start_from: a finished run's directory whose weights (its lora/, merged into the UNet, or its unet/) replace
    the model's before training starts, so they are also the reference (D3PO's rounds of human feedback).
    reference=True: `reference_model(pipe)` must work. With LoRA that costs nothing (the adapters are switched
    off); with full fine-tuning a frozen copy of the starting UNet is kept, as the papers' code does.
    """
    import diffusers
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    for lib in (diffusers, transformers):  # keep the terminal for our own progress bars and metrics
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    device = torch.device(device)
    half = resolve_precision(mixed_precision, device)
    weight_dtype = half or torch.float32
    if model == "toy":
        model = TOY_MODEL
    is_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not os.path.isdir(model) and not is_hub_id:
        raise UserError(f"model directory {model!r} does not exist (give a local diffusers directory or a hub id).")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    except Exception as e:  # diffusers raises OSError, ValueError or hub errors; all mean "not loadable"
        if os.path.isdir(model):
            raise UserError(f"could not load a Stable Diffusion pipeline from {model!r}: {str(e).splitlines()[0]}")
        raise UserError(f"could not reach or load {model!r} from the Hugging Face Hub (offline?); "
                        f"download it once, or pass a local diffusers directory with --model.")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if start_from:
        load_start_weights(pipe, start_from)
    pipe.resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)

    pipe.vae.requires_grad_(False).to(device, weight_dtype)
    pipe.text_encoder.requires_grad_(False).to(device, weight_dtype)
    if lora_rank > 0:
        from peft import LoraConfig
        pipe.unet.requires_grad_(False).to(device, weight_dtype)
        torch.manual_seed(seed)  # LoRA's A matrices are random (B starts at zero, so the model is unchanged)
        pipe.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS[lora_targets]))
    else:
        pipe.unet.requires_grad_(True).to(device, torch.float32)
        if reference:
            pipe.reference_unet = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # trainable weights stay float32 under mixed precision
    autocast = (lambda: torch.autocast(device.type, dtype=half)) if half is not None else nullcontext
    return pipe, trainable, autocast


def load_start_weights(pipe, run_dir):
    """Replace the pipeline's UNet weights by those a run saved in run_dir (lora/ is fused into the UNet)."""
    from diffusers import UNet2DConditionModel
    if os.path.isdir(os.path.join(run_dir, "lora")):
        pipe.load_lora_weights(os.path.join(run_dir, "lora"))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    elif os.path.isdir(os.path.join(run_dir, "unet")):
        pipe.unet = UNet2DConditionModel.from_pretrained(os.path.join(run_dir, "unet"))
    else:
        raise UserError(f"--start-from {run_dir!r}: no lora/ or unet/ there, so it is not a finished run.")


@contextmanager
def reference_model(pipe):
    """Inside this context the UNet is the model before fine-tuning (needs load_pipeline(reference=True)).

    With LoRA the adapters are switched off, so the reference policy costs no second copy of the UNet; with
    full fine-tuning the frozen copy made at loading stands in for the UNet."""
    trained = pipe.unet
    if getattr(pipe, "reference_unet", None) is not None:
        pipe.unet = pipe.reference_unet
    else:
        pipe.unet.disable_adapters()
    try:
        yield
    finally:
        if pipe.unet is trained:
            pipe.unet.enable_adapters()
        pipe.unet = trained


def make_optimizer(params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """AdamW with the reference code's settings."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def make_scaler(device, mixed_precision):
    """A gradient scaler, active only for fp16 on CUDA (fp16 gradients of small losses underflow otherwise)."""
    device = torch.device(device)
    enabled = device.type == "cuda" and resolve_precision(mixed_precision, device) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)


def optimizer_step(optimizer, scaler, params, max_grad_norm):
    """Unscale (fp16), clip the gradient norm, step, and zero the gradients; returns the pre-clip norm."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# --------------------------------------------------------------------------------------------------------------
# Rewards and prompts
# --------------------------------------------------------------------------------------------------------------

def to_uint8(images):
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8 numpy array."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def jpeg_kb(images, quality=95):
    """Size in kB of each image saved as JPEG at quality 95 (DDPO Sec. 6.1)."""
    sizes = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return np.array(sizes, dtype=np.float32)


def jpeg_compressibility(images, prompts):
    """DDPO's compressibility reward: minus the JPEG size in kB."""
    return -jpeg_kb(images)


def jpeg_incompressibility(images, prompts):
    """DDPO's incompressibility reward: the JPEG size in kB."""
    return jpeg_kb(images)


# The shapes world (tutorials/make_toy_model.py): one coloured shape on a light background, captioned like
# "a small red circle". Its rewards read pixels with fixed rules (no learned weights), so a student can
# check every number by hand. Each attribute gets a soft score in [0, 1], so a sample that is nearly right
# earns nearly full marks: dense rewards teach far faster than all-or-nothing ones.
BACKGROUND = (0.92, 0.92, 0.92)
COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.15, 0.65, 0.2), "blue": (0.15, 0.3, 0.85), "yellow": (0.95, 0.8, 0.1)}
# how much of its bounding box each shape fills, as measured on rendered 32 px images (exactly: pi/4, 1 and
# 1/2; anti-aliased edges at the detector's threshold widen the small triangle's share)
SHAPES = {"circle": 0.78, "square": 0.99, "triangle": 0.57}
# the "radius" of each size as a share of the image width (the renderer draws it uniformly in this range); a
# circle's or triangle's bounding box is 2 r wide, a square's 1.8 r, so the boxes of the two sizes never overlap
SIZES = {"small": (0.12, 0.16), "large": (0.23, 0.28)}
SIZE_THRESHOLD = 0.39   # the detector's boundary between the sizes: box extent / image width (12.5 px at 32)


def parse_shape_prompt(prompt):
    """The attributes a shapes-world prompt names: {'colour': ..., 'shape': ..., 'size': ...} (any may be absent)."""
    words = prompt.lower().replace(",", " ").split()
    named = {}
    for key, vocabulary in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES)):
        found = [w for w in words if w in vocabulary]
        if found:
            named[key] = found[0]
    return named


def detect_shapes(images, threshold=0.25):
    """Read each image's shape with fixed rules. Returns a list of dicts with, per image:
    'mask_fraction' (share of pixels off the background), and soft probabilities 'colour', 'shape', 'size'
    (dicts over the world's values), or None where the image shows no shape at all."""
    x = images.detach().float().cpu().clamp(0, 1)                            # (B, 3, H, W)
    B, _, H, W = x.shape
    background = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    mask = (x - background).norm(dim=1) > threshold                          # (B, H, W) foreground
    palette = torch.tensor(list(COLOURS.values()))                           # (K, 3)
    results = []
    for i in range(B):
        m = mask[i]
        area = int(m.sum())
        if area < 4:
            results.append(None)
            continue
        # colour: mean foreground colour, softmax over minus its distance to each palette colour (scale 0.1)
        mean_colour = x[i][:, m].mean(dim=1)
        colour_p = torch.softmax(-(palette - mean_colour).norm(dim=1) / 0.1, dim=0)
        # shape: how much of its bounding box the shape fills, against SHAPES, softmax with scale 0.05
        rows, cols = m.any(dim=1).nonzero(), m.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = area / float(box)
        shape_p = torch.softmax(-torch.tensor([abs(fill - f) for f in SHAPES.values()]) / 0.05, dim=0)
        # size: the longer side of the bounding box against SIZE_THRESHOLD, a sigmoid with scale 1 px
        extent = max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1
        large = torch.sigmoid(torch.tensor((extent - SIZE_THRESHOLD * W) / 1.0))
        results.append({"mask_fraction": area / (H * W), "fill": fill, "extent": extent / W,
                        "colour": dict(zip(COLOURS, colour_p.tolist())),
                        "shape": dict(zip(SHAPES, shape_p.tolist())),
                        "size": {"small": float(1 - large), "large": float(large)}})
    return results


def shape_scores(images, prompts):
    """(soft, hard, right) per image: soft is the mean over the prompt's named attributes of the detector's
    probability of the named value; right is the share of named attributes whose most probable value is the
    named one (0, 1/3, 2/3 or 1), and hard is 1 where all of them are."""
    soft, right = [], []
    for detected, prompt in zip(detect_shapes(images), prompts):
        named = parse_shape_prompt(prompt)
        if not named:
            raise UserError(f"the shapes rewards need prompts like 'a small red circle'; got {prompt!r}.")
        if detected is None:
            soft.append(0.0), right.append(0.0)
            continue
        soft.append(float(np.mean([detected[k][v] for k, v in named.items()])))
        right.append(float(np.mean([max(detected[k], key=detected[k].get) == v for k, v in named.items()])))
    right = np.array(right, dtype=np.float32)
    return np.array(soft, dtype=np.float32), (right == 1).astype(np.float32), right


def shapes_alignment(images, prompts):
    """Prompt alignment in the shapes world, dense, in [0, 1] (see shape_scores)."""
    return shape_scores(images, prompts)[0]


def shapes_correct(images, prompts):
    """Prompt alignment as a person would count it: the share of the prompt's colour, shape and size drawn right.

    Coarser than shapes_alignment, whose small differences between two images of one prompt (a slightly rounder
    square) are mostly noise: compared in pairs, this one calls such images a tie, as a labeller would."""
    return shape_scores(images, prompts)[2]


def shape_area(images, prompts):
    """A DDPO-style objective in the shapes world: the share of the image the shape covers (bigger is better)."""
    return np.array([0.0 if d is None else d["mask_fraction"] for d in detect_shapes(images)], dtype=np.float32)


REWARDS = {"jpeg_compressibility": jpeg_compressibility, "jpeg_incompressibility": jpeg_incompressibility,
           "shapes_alignment": shapes_alignment, "shapes_correct": shapes_correct, "shape_area": shape_area}


def get_reward_fn(name):
    """A reward by name, or 'module:function' for your own: fn(images (B,3,H,W) in [0,1], prompts) -> (B,)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module_name, fn_name = name.split(":", 1)
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise UserError(f"could not import reward {name!r}: {e}.")
        if not callable(fn):
            raise UserError(f"reward {name!r} is not a function.")
        return fn
    raise UserError(f"unknown reward {name!r}; known rewards are {', '.join(sorted(REWARDS))}, "
                    f"or give your own as module:function.")


def compute_rewards(reward_fn, images, prompts):
    """Call a reward function and check that it gave one finite number per image: float32 numpy (B,)."""
    rewards = reward_fn(images, prompts)
    rewards = np.asarray(rewards.detach().cpu() if torch.is_tensor(rewards) else rewards, dtype=np.float32)
    if rewards.shape != (len(prompts),):
        raise UserError(f"the reward returned shape {rewards.shape} for {len(prompts)} images; it must be one number each.")
    return rewards


def load_prompts(path):
    """Prompts from a text file: one a line; blank lines and lines starting with '#' are skipped."""
    if not os.path.isfile(path) and os.path.isfile(os.path.join(PROJECT, path)):
        path = os.path.join(PROJECT, path)  # the project's own prompt files work from any directory
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {path!r} has no prompts (one a line; '#' starts a comment).")
    return prompts


# --------------------------------------------------------------------------------------------------------------
# Command line: a dataclass of arguments, each with its help text and the source of its default
# --------------------------------------------------------------------------------------------------------------

def arg(default, help, choices=None):
    """A dataclass field that becomes a command-line flag with this help text."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def parse_args(args_class, argv=None, description=None, presets=None):
    """Build --kebab-case flags from a dataclass, parse argv, and apply presets and --resume.

    presets maps a --model value to defaults that replace the dataclass's for that model (flags given on the
    command line still win). With --resume DIR the run's saved config.json is loaded, and only flags given
    on this command line (for example a larger --num-epochs) override it; the run goes on writing into DIR.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    epilog = "\n".join(f"--model {name} changes these defaults: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in preset.items()) for name, preset in (presets or {}).items())
    # allow_abbrev=False: presets and --resume must see which flags were given, by their full names
    parser = argparse.ArgumentParser(description=description, epilog=epilog, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    flags = {}
    for f in dataclasses.fields(args_class):
        flag = "--" + f.name.replace("_", "-")
        flags[f.name] = flag
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=f.type if f.type in (int, float) else str, default=f.default,
                                choices=f.metadata["choices"], help=help_text, metavar=None)
    ns = vars(parser.parse_args(argv))
    given = {name for name, flag in flags.items()  # a bool flag is also given as --no-<name>
             if any(a in (flag, "--no-" + flag[2:]) or a.startswith(flag + "=") for a in argv)}
    if not ns.get("resume") and ns["model"] in (presets or {}):
        ns.update({k: v for k, v in presets[ns["model"]].items() if k not in given})
    if ns.get("resume"):
        config_path = os.path.join(ns["resume"], "config.json")
        if not os.path.isfile(config_path):
            raise UserError(f"--resume {ns['resume']!r}: no config.json there, so it is not a run directory.")
        with open(config_path) as fh:
            saved = json.load(fh)
        ns.update({k: v for k, v in saved.items() if k in flags and k not in given and k != "resume"})
        ns["output_dir"] = ns["resume"]
    return args_class(**ns)


# --------------------------------------------------------------------------------------------------------------
# Run output: config, metrics, image grids, LoRA, checkpoints (written atomically)
# --------------------------------------------------------------------------------------------------------------

def check_args(args):
    """Checks shared by the three scripts, made before any model is loaded."""
    if not 0 < args.eta <= 1:
        raise UserError(f"--eta must be in (0, 1] (got {args.eta}): with eta = 0 DDIM is deterministic and "
                        f"log-probs are undefined, and above 1 the step's variance exceeds what DDIM allows.")
    for name in ("num_epochs", "num_steps", "sample_batch_size", "sample_batches_per_epoch", "train_batch_size",
                 "gradient_accumulation_steps", "resolution"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    if args.sample_batch_size % args.train_batch_size:
        raise UserError(f"--train-batch-size {args.train_batch_size} must divide --sample-batch-size "
                        f"{args.sample_batch_size}.")
    train_batches = args.sample_batch_size * args.sample_batches_per_epoch // args.train_batch_size
    if train_batches % args.gradient_accumulation_steps:
        raise UserError(f"the {train_batches} training batches per epoch cannot be split into optimiser steps of "
                        f"--gradient-accumulation-steps {args.gradient_accumulation_steps}.")
    if args.resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8 (got {args.resolution}).")
    if args.lora_rank < 0:
        raise UserError(f"--lora-rank must be 0 (full fine-tuning) or more (got {args.lora_rank}).")


def atomic_write(path, write):
    """Write a file through `write(tmp_path)` and rename it into place, so an interruption leaves the old one."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_config(args):
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write(os.path.join(args.output_dir, "config.json"),
                 lambda p: open(p, "w").write(json.dumps(dataclasses.asdict(args), indent=2) + "\n"))


def append_metrics(output_dir, row):
    """One JSON object per epoch in metrics.jsonl; also printed as one line."""
    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def read_metrics(output_dir):
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_grid(images, captions, path, columns=8, scale=1):
    """Save images (B, 3, H, W) in [0, 1] as one PNG grid, each with a short caption beneath (and each image
    enlarged `scale` times, pixel for pixel, for small models)."""
    arrays = to_uint8(images).repeat(scale, axis=1).repeat(scale, axis=2)
    n, (h, w) = len(arrays), arrays.shape[1:3]
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    cell_w, text_h = max(w, 96), 12
    grid = Image.new("RGB", (columns * cell_w, rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (arr, caption) in enumerate(zip(arrays, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * (h + text_h)
        grid.paste(Image.fromarray(arr), (x + (cell_w - w) // 2, y))
        draw.text((x + 2, y + h), caption[: cell_w // 6], fill="black")
    atomic_write(path, lambda p: grid.save(p, format="PNG"))


CURVE_SKIP = ("epoch", "reward_std", "sample_seconds", "train_seconds")


def save_curves(rows, path, width=240, height=110, columns=3):
    """Plot each numeric metric of metrics.jsonl rows against the epoch, one small panel each, into one PNG:
    reward_mean first, with a band of +- reward_std; its title gives the first and last value."""
    keys = [k for k in rows[0] if k not in CURVE_SKIP and isinstance(rows[0][k], (int, float))]
    keys.sort(key=lambda k: k != "reward_mean")
    rows_n = math.ceil(len(keys) / columns)
    image = Image.new("RGB", (columns * width, rows_n * height), "white")
    draw = ImageDraw.Draw(image)
    epochs = [r["epoch"] for r in rows]
    for i, key in enumerate(keys):
        left, top = (i % columns) * width, (i // columns) * height
        x0, x1, y0, y1 = left + 34, left + width - 8, top + 16, top + height - 14  # the plot box
        curve = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        finite = [v for _, v in curve]
        band = [(r[key] - r["reward_std"], r[key] + r["reward_std"]) for r in rows
                if key == "reward_mean" and math.isfinite(r[key] + r.get("reward_std", math.nan))]
        low, high = min(finite + [b[0] for b in band], default=0.0), max(finite + [b[1] for b in band], default=1.0)
        high = high if high > low else low + 1.0
        e_low, e_span = epochs[0], max(epochs[-1] - epochs[0], 1)

        def point(epoch, v):
            return x0 + (x1 - x0) * (epoch - e_low) / e_span, y1 - (y1 - y0) * (v - low) / (high - low)

        draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
        title = key if not finite else f"{key}: {finite[0]:.3g} -> {finite[-1]:.3g}"
        draw.text((left + 4, top + 2), title, fill="black")
        draw.text((left + 2, y0), f"{high:.4g}", fill=(90, 90, 90))
        draw.text((left + 2, y1 - 10), f"{low:.4g}", fill=(90, 90, 90))
        draw.text((x0, y1 + 2), f"epoch {epochs[0]}", fill=(90, 90, 90))
        draw.text((x1 - 40, y1 + 2), f"{epochs[-1]}", fill=(90, 90, 90))
        if len(band) == len(rows) > 1:
            draw.polygon([point(e, b[1]) for e, b in zip(epochs, band)] +
                         [point(e, b[0]) for e, b in reversed(list(zip(epochs, band)))], fill=(205, 220, 245))
        points = [point(e, v) for e, v in curve]
        if len(points) > 1:
            draw.line(points, fill=(30, 80, 200), width=2)
        for p in points[-1:]:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(30, 80, 200))
    atomic_write(path, lambda p: image.save(p, format="PNG"))


def trainable_state(pipe):
    """The trainable parameters by name (the LoRA weights, or the whole UNet for full fine-tuning)."""
    return {name: p.detach().cpu().clone() for name, p in pipe.unet.named_parameters() if p.requires_grad}


def save_checkpoint(pipe, optimizer, scaler, epoch, extra, output_dir):
    """Everything needed to continue after `epoch`, then the LoRA (or UNet) for diffusers; both atomically."""
    state = {"epoch": epoch, "model": trainable_state(pipe), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "extra": extra}
    atomic_write(os.path.join(output_dir, "checkpoint.pt"), lambda p: torch.save(state, p))
    save_weights(pipe, output_dir)


def load_checkpoint(pipe, optimizer, scaler, output_dir):
    """Restore a checkpoint written by save_checkpoint; returns (next_epoch, extra)."""
    path = os.path.join(output_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"--resume {output_dir!r}: no checkpoint.pt there (the run stopped before its first epoch ended).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["epoch"] + 1, state["extra"]


def save_weights(pipe, output_dir):
    """Save what was trained where diffusers loads it: <output_dir>/lora for LoRA, <output_dir>/unet otherwise.

    The new directory is written beside the old one and swapped in, so an interruption never leaves neither.
    """
    lora = any("lora" in n for n, p in pipe.unet.named_parameters() if p.requires_grad)
    final = os.path.join(output_dir, "lora" if lora else "unet")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    if lora:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
    else:
        pipe.unet.save_pretrained(tmp, safe_serialization=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def epoch_generator(seed, epoch):
    """A CPU generator seeded by (seed, epoch): every epoch's randomness is reproducible, so resuming at epoch
    k gives the same run as not stopping."""
    return torch.Generator("cpu").manual_seed(seed * 1_000_003 + epoch)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def start_output(args, start_epoch):
    """Create the output directory and config.json; on resume drop metrics of epochs that will be redone."""
    if start_epoch == 0 and os.path.isfile(os.path.join(args.output_dir, "checkpoint.pt")):
        raise UserError(f"{args.output_dir!r} already holds a run; continue it with --resume {args.output_dir} "
                        f"or choose another --output-dir.")
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    write_config(args)
    rows = [r for r in read_metrics(args.output_dir) if r["epoch"] < start_epoch]
    atomic_write(os.path.join(args.output_dir, "metrics.jsonl"),
                 lambda p: open(p, "w").write("".join(json.dumps(r) + "\n" for r in rows)))
    print(f"writing to {args.output_dir}", flush=True)


def end_epoch(pipe, optimizer, scaler, args, epoch, metrics, images, prompts, rewards, extra, grid_size=16):
    """Image grid, a metrics line, the curves so far, then the checkpoint: an interruption at any point loses at
    most this epoch."""
    captions = list(prompts) if rewards is None else [f"{r:.3g} {p}" for p, r in zip(prompts, rewards)]
    save_grid(images[:grid_size], captions[:grid_size], os.path.join(args.output_dir, "samples", f"epoch_{epoch:04d}.png"))
    append_metrics(args.output_dir, metrics)
    save_curves(read_metrics(args.output_dir), os.path.join(args.output_dir, "curves.png"))
    save_checkpoint(pipe, optimizer, scaler, epoch, extra, args.output_dir)


def finish(args):
    print(f"done: metrics in {args.output_dir}/metrics.jsonl, image grids in {args.output_dir}/samples/, "
          f"weights in {args.output_dir}/{'lora' if args.lora_rank > 0 else 'unet'}", flush=True)
