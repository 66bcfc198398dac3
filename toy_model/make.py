"""Make the shapes-world toy model: a small text-to-image latent diffusion model trained on the CPU.

    python -m toy_model.make                 # about 20 minutes on two cores; writes toy_model/

The world: one shape (circle, square or triangle), small or large, in one of four colours, anywhere on a light
32 x 32 image, captioned "a small red circle". The script renders that data set on the fly, then trains
  1. a VAE (AutoencoderKL, 32 px -> 4 x 16 x 16 latents), by reconstruction with a small KL term;
  2. a CLIP text encoder from scratch, with a byte-pair tokenizer whose merges spell the world's words,
     together with a conditional UNet, by the usual noise-prediction loss (Stable Diffusion's noise schedule;
     10% empty captions so classifier-free guidance works);
and saves a StableDiffusionPipeline directory (float32 safetensors, DDIM scheduler configured like Stable
Diffusion's), which every script loads with `--model toy`, by the same code that loads Stable Diffusion, and which
plain diffusers loads and samples with `StableDiffusionPipeline.from_pretrained("toy_model")`. The world itself
(colours, shapes, sizes, the renderer and the detector) is toy_model/world.py.

The UNet is trained deliberately briefly: the model must follow its prompts only partly, so that
fine-tuning has something to improve. It prints the prompt alignment it reaches every --eval-every steps.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
from toy_model.world import (WORDS, all_prompts, caption, detect_shapes, parse_shape_prompt, random_attributes, render,
                             shape_scores)

HERE = os.path.dirname(os.path.abspath(__file__))  # the pipeline is written beside this file


def batch(rng, n, resolution=32, drop_size=0.1, drop_all=0.1):
    """n rendered images as a (n, 3, H, W) tensor in [-1, 1] and their captions: 10% leave out the size, 10%
    are empty (the unconditional prompt of classifier-free guidance)."""
    images, captions = [], []
    for _ in range(n):
        colour, shape, size = random_attributes(rng)
        images.append(render(colour, shape, size, rng, resolution))
        u = rng.random()
        captions.append("" if u < drop_all else f"a {colour} {shape}" if u < drop_all + drop_size
                        else caption(colour, shape, size))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, captions


# ---------------------------------------------------------------------------------------------------------
# A CLIP byte-pair tokenizer that spells whole words
# ---------------------------------------------------------------------------------------------------------

def bpe(word, merges):
    """How CLIP's tokenizer splits a word: start from its letters (the last one carries '</w>') and apply the
    merge of lowest rank present, again and again (this is byte-pair encoding)."""
    rank = {pair: i for i, pair in enumerate(merges)}
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(rank.get(pair, len(rank)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        best, i = min(pairs)
        if best == len(rank):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def bpe_merges(words):
    """Merges that make each word one token: without them CLIP's tokenizer turns every word of more than one
    letter into <|endoftext|>. A new merge joins the first two pieces the merges so far leave of a word, so an
    earlier word's merge ("r e" of "red") cannot split a later one ("green")."""
    merges = []
    for word in words:
        while len(pieces := bpe(word, merges)) > 1:
            merges.append((pieces[0], pieces[1]))
    made = [a + b for a, b in merges]
    return merges, made


def write_tokenizer(path, words, max_length=16):
    from transformers import CLIPTokenizer
    os.makedirs(path, exist_ok=True)
    letters = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz"))
    merges, made = bpe_merges(words)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    tokens += [t for t in dict.fromkeys(made) if t not in tokens]
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                         model_max_length=max_length)


# ---------------------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------------------

def make_models(tokenizer, resolution=32):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=resolution)
    # cross-attention only at 8 x 8: at 16 x 16 too, a step costs about ten times more on the CPU
    unet = UNet2DConditionModel(sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=32)
    return vae, text_encoder, unet


def sd_ddim_scheduler():
    """Stable Diffusion v1.5's scheduler settings."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def train_vae(vae, rng, steps, batch_size, log):
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    for step in range(1, steps + 1):
        x, _ = batch(rng, batch_size)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            log(f"vae step {step}/{steps}  reconstruction mse {mse.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SD's scaling factor makes the latents unit-variance for the UNet
        latents = torch.cat([vae.encode(batch(rng, batch_size)[0]).latent_dist.sample() for _ in range(8)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    log(f"vae scaling factor {vae.config.scaling_factor:.4f}")


def make_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def evaluate(pipe, images_per_prompt=4, seed=1234, num_steps=20):
    """Prompt alignment of the pipeline on every prompt: (mean soft score, share of images fully right, and the
    share of images right in each attribute)."""
    pipe.resolution = 32
    prompts = [p for p in all_prompts() for _ in range(images_per_prompt)]
    policy = common.Policy(pipe, common.encode_prompts(pipe, [""]), num_steps, guidance_scale=5.0, eta=1.0)
    images = common.evaluate(policy, prompts, seed)
    soft, hard, _ = shape_scores(images, prompts)
    right = {key: float(np.mean([d is not None and max(d[key], key=d[key].get) == named[key]
                                 for d, named in zip(detect_shapes(images), map(parse_shape_prompt, prompts))]))
             for key in ("colour", "shape", "size")}
    return float(soft.mean()), float(hard.mean()), right


def train_unet(pipe, rng, steps, batch_size, lr, log, eval_every, snapshot_dir=None):
    from diffusers import DDPMScheduler
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    for step in range(1, steps + 1):
        unet.train(), text_encoder.train()
        x, captions = batch(rng, batch_size)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch_size,))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps:
            log(f"unet step {step}/{steps}  noise-prediction mse {loss.item():.4f}")
        if eval_every and (step % eval_every == 0 or step == steps):
            unet.eval(), text_encoder.eval()
            soft, hard, right = evaluate(pipe)
            log(f"unet step {step}: prompt alignment {100 * soft:.1f} (soft), {100 * hard:.1f}% fully right; right "
                + ", ".join(f"{key} {100 * share:.0f}%" for key, share in right.items()))
            if snapshot_dir:
                pipe.save_pretrained(os.path.join(snapshot_dir, f"step{step:05d}"), safe_serialization=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m toy_model.make", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=HERE, help="pipeline directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    parser.add_argument("--vae-steps", type=int, default=600, help="VAE training steps")
    parser.add_argument("--unet-steps", type=int, default=1500, help="UNet + text encoder training steps")
    parser.add_argument("--batch-size", type=int, default=32, help="images per training step")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate of the UNet and text encoder")
    parser.add_argument("--eval-every", type=int, default=500, help="measure prompt alignment every N UNet steps")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's own, which follows OMP_NUM_THREADS)")
    parser.add_argument("--snapshots", default=None, help="also save the pipeline at every evaluation, under this folder")
    opts = parser.parse_args(argv)
    if opts.threads:  # process-wide: a test or notebook that calls main() keeps its own count without the flag
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(tmp, WORDS)
        vae, text_encoder, unet = make_models(tokenizer)
        log(f"parameters: vae {sum(p.numel() for p in vae.parameters()):,}, text encoder "
            f"{sum(p.numel() for p in text_encoder.parameters()):,}, unet {sum(p.numel() for p in unet.parameters()):,}")
        train_vae(vae, rng, opts.vae_steps, opts.batch_size, log)
        pipe = make_pipeline(vae, text_encoder, tokenizer, unet)
        train_unet(pipe, rng, opts.unet_steps, opts.batch_size, opts.lr, log, opts.eval_every, opts.snapshots)
        pipe.save_pretrained(opts.output, safe_serialization=True)  # float32: plain diffusers samples it on the CPU
    log(f"saved {opts.output}")


if __name__ == "__main__":
    main()
