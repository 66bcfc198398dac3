"""The policy of ddpo.py, d3po.py and prdp.py. Denoising is a decision process: state (c, t, x_t), action x_{t-1},
policy pi_theta(x_{t-1} | x_t, c) one guided stochastic DDIM step, a Gaussian (`ddim_step_with_logprob`). Here:
sampling trajectories, their log-probs with gradients (`log_prob`) and the reference model's (`reference_log_probs`),
loading Stable Diffusion with LoRA, the optimiser step. Notation (docs/papers.md): abar_t is DDPM's cumulative
alpha (diffusers' `alphas_cumprod`, the DDIM paper's alpha_t), sigma_t the step's standard deviation, eta its noise.
"""
import copy
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields

import torch
from tqdm.auto import tqdm

TOY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_model")  # --model toy
MODELS = {"toy": TOY_MODEL, "flow-toy": os.path.join(TOY_MODEL, "flow")}  # the shipped toy models by --model name


class UserError(Exception):
    """A mistake the user can fix; the scripts print its one sentence and exit, without a traceback."""


# ---- The policy: one stochastic DDIM step and the log-density of its outcome -----------------------------------------

def ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None, generator=None):
    """One DDIM step x_t -> x_{t-1} with noise (eta > 0) and the log-density of x_{t-1} under it.

    Returns prev_sample (B, C, H, W) and log_prob (B,), the Gaussian log-density AVERAGED over latent elements
    (reference code; times C*H*W for the sum), both float32 whatever model_output's dtype. A given prev_sample is
    scored as it is (training re-scores stored steps); `timestep` is a scalar or (B,). A step with sigma_t = 0 (the
    last with set_alpha_to_one=True) is deterministic, x_{t-1} = mean: no decision, so log-prob 0, no training.
    """
    if not eta > 0:
        raise UserError(f"eta must be > 0 (got {eta}): with eta = 0 DDIM is deterministic and log-probs are undefined.")
    if scheduler.config.get("thresholding", False):
        raise UserError("the model's scheduler uses dynamic thresholding, which this project does not support.")
    B, device, sample, model_output = sample.shape[0], sample.device, sample.float(), model_output.float()

    # the previous timestep of the DDIM grid, as in diffusers' DDIMScheduler.step, on the sample's device: the
    # schedule is moved there once (as diffusers' add_noise does), so that a step on a GPU never waits for the host
    scheduler.alphas_cumprod = alphas_cumprod = scheduler.alphas_cumprod.to(device)
    t = torch.as_tensor(timestep, device=device).long().reshape(-1).expand(B)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    # abar_prev: at the last step prev_t < 0 and abar_prev is the scheduler's final_alpha_cumprod, which is
    # abar_0 (not 1) for Stable Diffusion's set_alpha_to_one = False, so sigma never reaches 0 there.
    abar_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], float(scheduler.final_alpha_cumprod))
    abar_t, abar_prev = alphas_cumprod[t].float().view(B, 1, 1, 1), abar_prev.float().view(B, 1, 1, 1)

    # x0_hat and eps from the model output (docs/papers.md, the policy; v_prediction converted first)
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
    if scheduler.config.get("clip_sample", False):  # False for Stable Diffusion; eps is not recomputed, as diffusers
        r = scheduler.config.clip_sample_range
        x0_hat = x0_hat.clamp(-r, r)

    # var_t = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev);  sigma_t = eta * sqrt(var_t)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * variance.clamp(min=0).sqrt()                                 # (B, 1, 1, 1)
    # mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps   (DDIM Eq. 12)
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std**2).clamp(min=0).sqrt() * eps

    return gaussian_step(mean, std, prev_sample, generator)


def gaussian_step(mean, std, prev_sample=None, generator=None):
    """x_{t-1} = mean + std z, z ~ N(0, I) (or the given prev_sample, scored as it is), and log N(x_{t-1}; mean, std^2)
    averaged over latent elements, (B,); a step with std = 0 is deterministic: no decision, log-prob 0."""
    B, device = mean.shape[0], mean.device
    if prev_sample is None:
        # drawn on the generator's device (CPU by default), so results do not depend on the GPU
        noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else device)
        prev_sample = mean + std * noise.to(device)  # x_{t-1} = mean + sigma_t z
    prev_sample = prev_sample.float()

    # log N(x_{t-1}; mean, sigma_t^2) = -(x - mean)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi), per element
    stochastic = std > 0
    s = torch.where(stochastic, std, torch.ones_like(std))  # sigma_t, or 1 where the step is deterministic
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * s**2) - s.log() - 0.5 * math.log(2 * math.pi)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))  # mean over C, H, W -> (B,)
    return prev_sample, torch.where(stochastic.view(B), log_prob, torch.zeros_like(log_prob))


def flow_step_with_logprob(scheduler, velocity, timestep, sample, noise_level=0.7, prev_sample=None, generator=None):
    """One step t -> t_next (< t) of a rectified-flow model's SDE, and the log-density of its outcome: the policy of a
    flow model (Stable Diffusion 3), as ddim_step_with_logprob is Stable Diffusion's; same arguments and returns, with
    Flow-GRPO's noise level a (noise_level) for eta.

    A flow model's x_t = (1 - t) x_0 + t eps runs from noise (t = 1) to the image (t = 0) along the ODE dx = v dt, v
    the model's velocity. The SDE with the same marginals (Flow-GRPO, arXiv 2505.05470; docs/papers.md derives it)
    dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dw,  sigma_t = a sqrt(t / (1 - t)),
    taken in one Euler-Maruyama step (dt = t_next - t < 0), is the Gaussian N(mean, sigma_t^2 |dt|).
    """
    if not noise_level > 0:
        raise UserError(f"the noise level must be > 0 (got {noise_level}): at 0 the flow step is the deterministic "
                        f"ODE step and log-probs are undefined.")
    B, device, sample, v = sample.shape[0], sample.device, sample.float(), velocity.float()
    # the step's place in the schedule: t = sigmas[i] (diffusers' timesteps are 1000 t), t_next = sigmas[i + 1]
    scheduler.sigmas = sigmas = scheduler.sigmas.to(device, torch.float32)  # on the sample's device, as DDIM's above
    i = (scheduler.timesteps.to(device) - torch.as_tensor(timestep, device=device).reshape(-1, 1)).abs().argmin(1)
    t, t_next = sigmas[i].expand(B).view(B, 1, 1, 1), sigmas[i + 1].expand(B).view(B, 1, 1, 1)
    dt = t_next - t                                                          # < 0: from noise towards the image
    # sigma_t = a sqrt(t / (1 - t)) is infinite at t = 1: there Flow-GRPO's code divides by 1 - (the next t) instead
    sigma_t = noise_level * (t / (1 - torch.where(t == 1, sigmas[1], t))).sqrt()
    # Euler-Maruyama: mean = x + [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt,  std = sigma_t sqrt(-dt)
    mean = sample + (v + sigma_t**2 / (2 * t) * (sample + (1 - t) * v)) * dt
    return gaussian_step(mean, sigma_t * (-dt).sqrt(), prev_sample, generator)


def step_with_logprob(policy, model_output, timestep, sample, prev_sample=None, generator=None):
    """The policy's step: the flow SDE's for a flow-matching scheduler (Stable Diffusion 3), else DDIM's."""
    flow = type(policy.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    step = flow_step_with_logprob if flow else ddim_step_with_logprob
    return step(policy.pipe.scheduler, model_output, timestep, sample, policy.eta, prev_sample, generator)


# ---- Guided noise prediction, sampling trajectories, and their log-probs ---------------------------------------------

@dataclass
class Policy:
    """pi_theta(x_{t-1} | x_t, c): the UNet guided against the empty prompt, in a stochastic DDIM step of num_steps
    (for a flow model: its transformer, which load_pipeline also calls pipe.unet, in the flow SDE's step)."""
    pipe: object
    negative_embeds: torch.Tensor  # (1, L, D) the empty prompt's embedding
    num_steps: int
    guidance_scale: float
    eta: float                     # the step's noise: DDIM's eta, or Flow-GRPO's noise level a for a flow model
    autocast: object = nullcontext
    negative_pooled: torch.Tensor = None  # (1, P) the empty prompt's pooled embedding (SD3; None for SD)


def encode_prompts(pipe, prompts, pooled=False):
    """Text embeddings (B, L, D) of a list of prompts, as the pipeline makes them (SD: CLIP's, padded to the
    tokenizer's length); pooled=True: also the pooled embedding (B, P) that SD3's transformer reads (None for SD)."""
    with torch.no_grad():
        if hasattr(pipe, "transformer"):  # SD3: two CLIP encoders (sequence and pooled) and T5 (sequence)
            embeds, _, pooled_embeds, _ = pipe.encode_prompt(prompts, None, None, device=pipe.text_encoder.device,
                                                             do_classifier_free_guidance=False,
                                                             max_sequence_length=pipe.max_sequence_length)
        else:
            ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
            embeds, pooled_embeds = pipe.text_encoder(ids)[0], None
    return (embeds, pooled_embeds) if pooled else embeds


def denoise(unet, latents, timestep, embeds, pooled=None):
    """The network's prediction: SD's UNet predicts the noise eps; SD3's transformer (pooled given) the velocity v,
    reading the pooled embedding too and a timestep for every sample."""
    if pooled is None:
        return unet(latents, timestep, encoder_hidden_states=embeds).sample
    t = torch.as_tensor(timestep, device=latents.device).expand(latents.shape[0])
    return unet(hidden_states=latents, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample


def guided_noise_pred(policy, latents, timestep, prompt_embeds, pooled_embeds=None):
    """Classifier-free guidance, eps_uncond + w (eps_cond - eps_uncond), with both halves in ONE UNet call; at w = 1
    the conditional prediction alone (the same for a flow model's velocity). It serves sampling and training: the
    policy trained is the one that sampled."""
    unet, B, w = policy.pipe.unet, latents.shape[0], policy.guidance_scale
    with policy.autocast():
        if w == 1.0:
            return denoise(unet, latents, timestep, prompt_embeds, pooled_embeds)
        t = timestep.repeat(2) if torch.as_tensor(timestep).ndim > 0 else timestep
        embeds = torch.cat([policy.negative_embeds.expand(B, -1, -1), prompt_embeds])
        pooled = None if pooled_embeds is None else torch.cat([policy.negative_pooled.expand(B, -1), pooled_embeds])
        uncond, cond = denoise(unet, torch.cat([latents, latents]), t, embeds, pooled).chunk(2)
    return uncond + w * (cond - uncond)


@dataclass
class Trajectories:
    """What sampling returns; all tensors on the sampling device, latents and log-probs in float32."""
    images: torch.Tensor         # (B, 3, H, W) decoded images in [0, 1]
    latents: torch.Tensor        # (B, T+1, C, h, w) x_T ... x_0
    log_probs: torch.Tensor      # (B, T) log pi(x_{t-1} | x_t, c) of each step, per-element mean
    timesteps: torch.Tensor      # (T,) the scheduler's timesteps, the same for every sample
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled_embeds: torch.Tensor = None  # (B, P) SD3's pooled prompt embeddings; None for SD


def decode(pipe, latents):
    """VAE-decode latents to float images in [0, 1], (B, 3, H, W)."""
    shift = pipe.vae.config.get("shift_factor") or 0.0  # SD3's VAE centres its latents; SD's does not
    with torch.no_grad():
        x = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor + shift).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


def latent_size(pipe):
    """(C, h, w) of the latents for the pipeline's configured resolution."""
    size = pipe.resolution // pipe.vae_scale_factor
    return pipe.unet.config.in_channels, size, size


@torch.no_grad()
def sample_trajectories(policy, prompt_embeds, generator, latents=None, progress=True, pooled_embeds=None):
    """Guided stochastic DDIM (or flow SDE) steps from x_T (given, or drawn) to x_0 for a batch of prompt embeddings,
    keeping every step."""
    pipe, B = policy.pipe, prompt_embeds.shape[0]
    pipe.scheduler.set_timesteps(policy.num_steps, device=prompt_embeds.device)
    if latents is None:
        latents = torch.randn((B, *latent_size(pipe)), generator=generator, device=generator.device)
    latents = latents.to(prompt_embeds.device, torch.float32) * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
    all_latents, all_log_probs = [latents], []
    # the bar only on a terminal (None: tqdm asks whether its output is one), never in a log or a notebook
    for t in tqdm(pipe.scheduler.timesteps, desc="sampling", leave=False, disable=None if progress else True):
        noise_pred = guided_noise_pred(policy, latents, t, prompt_embeds, pooled_embeds)
        latents, log_prob = step_with_logprob(policy, noise_pred, t, latents, None, generator)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return Trajectories(decode(pipe, latents), torch.stack(all_latents, dim=1), torch.stack(all_log_probs, dim=1),
                        pipe.scheduler.timesteps, prompt_embeds, pooled_embeds)


def log_prob(policy, samples, idx, s):
    """log pi_theta(x_{t-1} | x_t, c) under the CURRENT model, with gradients, of the stored steps s of samples
    idx: idx (b,) and s an int or (b,), one step of each sample. Returns (b,)."""
    x_t, x_prev, t = samples.latents[idx, s], samples.latents[idx, s + 1], samples.timesteps[s]
    pooled = None if samples.pooled_embeds is None else samples.pooled_embeds[idx]
    noise_pred = guided_noise_pred(policy, x_t, t, samples.prompt_embeds[idx], pooled)
    return step_with_logprob(policy, noise_pred, t, x_t, prev_sample=x_prev)[1]


def sample_epoch(policy, args, prompts, generator, images_per_prompt=1, shared_noise=False, draw=True,
                 progress=True, sample=None):
    """Sample args.sample_batch_size * args.sample_batches_per_epoch images, in batches of args.sample_batch_size:
    prompts drawn at random (draw=True), or each prompt given (draw=False), images_per_prompt images each, side by
    side; shared_noise=True gives a prompt's images one x_T (D3PO's pairs). Returns (prompts, Trajectories).
    sample: what samples one batch, sample_trajectories unless given (distributed.py gives one of its own)."""
    if draw:
        n_prompts = args.sample_batch_size * args.sample_batches_per_epoch // images_per_prompt
        prompts = [prompts[i] for i in torch.randint(len(prompts), (n_prompts,), generator=generator).tolist()]
    batch_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    noise = None
    if shared_noise:
        noise = torch.randn((len(prompts), *latent_size(policy.pipe)), generator=generator, device=generator.device)
        noise = noise.repeat_interleave(images_per_prompt, 0)
    parts, size = [], args.sample_batch_size
    for start in range(0, len(batch_prompts), size):
        embeds, pooled = encode_prompts(policy.pipe, batch_prompts[start:start + size], pooled=True)
        x_T = None if noise is None else noise[start:start + size]
        parts.append((sample or sample_trajectories)(policy, embeds, generator, x_T, progress, pooled))

    def join(name):  # the batches' tensors end to end; the timesteps (and a None) are every batch's
        values = [getattr(part, name) for part in parts]
        return values[0] if name == "timesteps" or values[0] is None else torch.cat(values)
    return batch_prompts, Trajectories(*(join(f.name) for f in fields(Trajectories)))


@torch.no_grad()
def reference_log_probs(policy, samples, batch_size, rows=None):
    """log pi_ref of every sampled step, (B, T): the reference model's log-probs do not depend on the trained
    parameters, so D3PO and PRDP compute them once per sample, here, and never in the training loop.
    rows: only these samples' (the ones that will be trained on); the other rows are NaN."""
    out = torch.full_like(samples.log_probs, float("nan"))
    rows = torch.arange(len(out)) if rows is None else torch.as_tensor(rows).flatten().cpu()
    with reference_model(policy.pipe):
        for start in range(0, len(rows), batch_size):
            idx = rows[start:start + batch_size].to(samples.latents.device)
            for s in range(out.shape[1]):
                out[idx, s] = log_prob(policy, samples, idx, s)
    return out


def evaluate(policy, prompts, seed, batch_size=32):
    """Each prompt's image from noise of `seed`, held apart from training's: compares models on the same noise."""
    generator = torch.Generator("cpu").manual_seed(seed)
    images = []
    for i in range(0, len(prompts), batch_size):
        embeds, pooled = encode_prompts(policy.pipe, prompts[i:i + batch_size], pooled=True)
        images.append(sample_trajectories(policy, embeds, generator, progress=False, pooled_embeds=pooled).images)
    return torch.cat(images)


# ---- Loading the model with LoRA, the reference model, the optimiser step --------------------------------------------

def resolve_precision(mixed_precision, device):
    """The autocast dtype for 'auto' | 'no' | 'fp16' | 'bf16' (auto: fp16 on CUDA, as the reference; no on CPU)."""
    if mixed_precision == "auto":
        mixed_precision = "fp16" if torch.device(device).type == "cuda" else "no"
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


# the UNet layers that get LoRA adapters, by --lora-targets (peft's target_modules). attention: every attention
# projection, as diffusers' LoRA examples do (the add_ ones: the prompt's side of SD3's joint attention);
# cross-attention: only attn2's, where the prompt enters the UNet.
LORA_TARGETS = {"attention": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                              "to_add_out"],
                "cross-attention": r".*attn2\.(to_[qkv]|to_out\.0)"}


def check_flow_model(pipe, lora_targets):
    """What this project needs of a flow pipeline, in one sentence each: a scheduler whose step it takes (fixed shift)
    and, with LoRA, targets that exist (SD3's attention is joint: no separate cross-attention)."""
    config, name = pipe.scheduler.config, type(pipe.scheduler).__name__
    unsupported = [key for key in ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas",
                                   "use_beta_sigmas", "invert_sigmas", "stochastic_sampling", "shift_terminal")
                   if config.get(key)]
    if name != "FlowMatchEulerDiscreteScheduler" or unsupported:
        raise UserError(f"the model's scheduler ({name} {' '.join(unsupported)}) is not one whose stochastic step this "
                        f"project takes: a flow model needs diffusers' FlowMatchEulerDiscreteScheduler, fixed shift.")
    if lora_targets == "cross-attention":
        raise UserError("--lora-targets cross-attention names the UNet's attn2 layers, which SD3 does not have (its "
                        "attention reads image and prompt together): use --lora-targets attention.")


def load_pipeline(model, device, mixed_precision="no", lora_rank=4, resolution=None, seed=0, start_from=None,
                  reference=False, lora_targets="attention", gradient_checkpointing=False, max_sequence_length=256):
    """Load a Stable Diffusion pipeline for fine-tuning: (pipe, trainable_params, autocast factory of the UNet).

    VAE and text encoder are frozen (in the half dtype under mixed precision). LoRA (lora_rank > 0) on the layers
    LORA_TARGETS[lora_targets] names is all that trains, in float32; lora_rank = 0 trains the whole UNet in float32.
    start_from: a finished run whose weights (lora/ merged, or unet/) replace the model's, so they are also the
    reference (D3PO's rounds). reference=True: `reference_model(pipe)` must work; free with LoRA (the adapters are
    switched off), a frozen copy of the UNet (in the half dtype) with full fine-tuning, as the papers' code does.
    """
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
    device, half = torch.device(device), resolve_precision(mixed_precision, device)
    model = MODELS.get(model, model)
    if not os.path.isdir(model) and not (model.count("/") == 1 and not model.startswith((".", "/", "~"))):
        raise UserError(f"model directory {model!r} does not exist (give a local diffusers directory or a hub id).")
    try:
        config = DiffusionPipeline.load_config(model)
        if config.get("_class_name", "").startswith("StableDiffusion3"):  # a flow model; saved without T5, so be it
            pipe = StableDiffusion3Pipeline.from_pretrained(model, **{name: None for name in ("text_encoder_3",
                                                                      "tokenizer_3") if not config.get(name, [0])[0]})
        else:
            pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    except Exception as e:  # diffusers raises OSError, ValueError or hub errors; all mean "not loadable"
        if os.path.isdir(model):
            raise UserError(f"could not load a Stable Diffusion pipeline from {model!r}: {str(e).splitlines()[0]}")
        raise UserError(f"could not reach or load {model!r} from the Hugging Face Hub (offline?); "
                        f"download it once, or pass a local diffusers directory with --model.")
    if hasattr(pipe, "transformer"):  # SD3: its transformer is the network that trains, pipe.unet here as in SD
        check_flow_model(pipe, lora_targets)
        pipe.unet, pipe.max_sequence_length = pipe.transformer, max_sequence_length
    else:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if start_from:
        load_start_weights(pipe, start_from)
    pipe.resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    for frozen in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), getattr(pipe, "text_encoder_3",
                                                                                            None)):
        if frozen is not None:
            frozen.requires_grad_(False).to(device, half or torch.float32)
    if lora_rank > 0:
        from peft import LoraConfig
        pipe.unet.requires_grad_(False).to(device, half or torch.float32)
        torch.manual_seed(seed)  # LoRA's A matrices are random (B starts at zero, so the model is unchanged)
        pipe.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS[lora_targets]))
    else:
        pipe.unet.requires_grad_(True).to(device, torch.float32)
        if reference:
            pipe.reference_unet = copy.deepcopy(pipe.unet).requires_grad_(False).eval().to(half or torch.float32)
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # trainable weights stay float32 under mixed precision
    autocast = (lambda: torch.autocast(device.type, dtype=half)) if half is not None else nullcontext
    return pipe, trainable, autocast


def load_policy(args, reference=False):
    """The pipeline as args configure it, as a Policy, and its trainable parameters."""
    pipe, params, autocast = load_pipeline(args.model, args.device, args.mixed_precision, args.lora_rank,
                                           args.resolution, args.seed, getattr(args, "start_from", None), reference,
                                           args.lora_targets, getattr(args, "gradient_checkpointing", False),
                                           getattr(args, "max_sequence_length", 256))  # runs older than SD3's
    negative_embeds, negative_pooled = encode_prompts(pipe, [""], pooled=True)
    noise = getattr(args, "noise_level", 0.7) if hasattr(pipe, "transformer") else args.eta  # Flow-GRPO's a, or eta
    return Policy(pipe, negative_embeds, args.num_steps, args.guidance_scale, noise, autocast, negative_pooled), params


def load_start_weights(pipe, run_dir, flag="--start-from"):
    """Load a run's lora/ (fused) or unet/ into the pipeline's UNet in place; another architecture's are refused."""
    lora, unet = os.path.join(run_dir, "lora"), os.path.join(run_dir, "unet")
    try:
        if os.path.isdir(lora):
            pipe.load_lora_weights(lora)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        else:
            pipe.unet.load_state_dict(type(pipe.unet).from_pretrained(unet).state_dict())  # UNet or SD3's transformer
    except Exception as e:  # no lora/ or unet/ (not a finished run), a truncated file, another model's weights
        raise UserError(f"{flag} {run_dir!r}: no finished run's weights (lora/ or unet/) for this model can be loaded "
                        f"from there ({str(e).splitlines()[0][:200]}).")


@contextmanager
def reference_model(pipe):
    """Inside this context the UNet is the model before fine-tuning, pi_ref (needs load_pipeline(reference=True))."""
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
    enabled = torch.device(device).type == "cuda" and resolve_precision(mixed_precision, device) == torch.float16
    return torch.amp.GradScaler(torch.device(device).type, enabled=enabled)


def minibatches(order, batch_size, step_size):
    """The one batching idiom of the three scripts: `order` (indices) cut into optimiser steps of `step_size`
    indices, each a list of training batches of at most `batch_size`."""
    steps = [order[start:start + step_size] for start in range(0, len(order), max(step_size, 1))]
    return [[step[i:i + batch_size] for i in range(0, len(step), batch_size)] for step in steps]


def optimizer_step(optimizer, scaler, params, max_grad_norm):
    """Unscale (fp16), clip, step, zero the gradients; returns the pre-clip norm. A non-finite gradient never reaches
    the weights: fp16's scaler skips that step; otherwise the run stops."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(norm) and not scaler.is_enabled():
        raise UserError("the gradient is not finite (NaN or infinite): the run stops before the optimiser step, and "
                        "its last checkpoint is kept; a lower --learning-rate may help.")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)
