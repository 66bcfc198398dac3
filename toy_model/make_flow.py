"""Make the shapes world's flow toy model: the same world learned by flow matching, as Stable Diffusion 3 is.

    python -m toy_model.make_flow            # about 8 minutes on two cores; writes toy_model/flow/

Beside toy_model/make.py, whose VAE it reuses (frozen): it trains, from scratch and together, two CLIP text
encoders with projections (SD3 reads the sequence of both and their pooled outputs side by side; there is no T5,
whose place the pipeline fills with --max-sequence-length zeros) and an SD3 transformer (joint attention over
image patches and prompt tokens) by rectified flow matching: x_t = (1 - t) x_0 + t eps, the transformer's target
the velocity eps - x_0, t drawn logit-normal as SD3 trains, 10% empty captions for classifier-free guidance. It saves a
StableDiffusion3Pipeline directory with diffusers' FlowMatchEulerDiscreteScheduler, which the scripts load with
`--model flow-toy` and plain diffusers with `StableDiffusion3Pipeline.from_pretrained("toy_model/flow",
text_encoder_3=None, tokenizer_3=None)` (sample it with max_sequence_length=MAX_SEQUENCE_LENGTH).
Like the first toy, it is trained briefly on purpose: it follows its prompts only partly.
"""
import argparse
import os
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import common
from toy_model.make import HERE, batch, write_tokenizer
from toy_model.world import WORDS, all_prompts, shape_scores

MAX_SEQUENCE_LENGTH = 8  # the T5 tokens SD3's pipeline adds (zeros here: no T5); 256 by default, a waste at this size


def make_models(tokenizer, resolution=32):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    text_encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=32, max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)) for _ in range(2)]
    vae = AutoencoderKL.from_pretrained(os.path.join(HERE, "vae")).requires_grad_(False).eval()
    vae.register_to_config(shift_factor=0.0)  # SD3's decoding adds it; the first toy's latents are not shifted
    # 4 x 16 x 16 latents in 2 x 2 patches: 64 image tokens, beside 16 + 16 CLIP and MAX_SEQUENCE_LENGTH zero tokens
    transformer = SD3Transformer2DModel(sample_size=resolution // 2, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=4, attention_head_dim=16, num_attention_heads=4,
                                        joint_attention_dim=128, caption_projection_dim=64, pooled_projection_dim=64,
                                        pos_embed_max_size=resolution // 4)
    return vae, text_encoders, transformer


def make_pipeline(vae, text_encoders, tokenizer, transformer, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizer,
                                    text_encoder_2=text_encoders[1], tokenizer_2=tokenizer, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet, pipe.max_sequence_length, pipe.resolution = transformer, MAX_SEQUENCE_LENGTH, 32  # as load_pipeline
    return pipe


def evaluate(pipe, images_per_prompt=4, seed=1234, num_steps=10):
    """Prompt alignment (mean soft score, share fully right) on every prompt, sampled with the policy's SDE step."""
    prompts = [p for p in all_prompts() for _ in range(images_per_prompt)]
    negative, negative_pooled = common.encode_prompts(pipe, [""], pooled=True)
    policy = common.Policy(pipe, negative, num_steps, 5.0, 0.7, nullcontext, negative_pooled)
    soft, hard, _ = shape_scores(common.evaluate(policy, prompts, seed), prompts)
    return float(soft.mean()), float(hard.mean())


def train(pipe, rng, steps, batch_size, lr, log, eval_every):
    transformer, vae = pipe.transformer, pipe.vae
    params = [p for m in (transformer, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    for step in range(1, steps + 1):
        for module in (transformer, pipe.text_encoder, pipe.text_encoder_2):
            module.train()
        x, captions = batch(rng, batch_size)
        with torch.no_grad():
            x_0 = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=MAX_SEQUENCE_LENGTH)
        eps = torch.randn_like(x_0)
        t = torch.sigmoid(torch.randn(batch_size)).view(-1, 1, 1, 1)  # logit-normal, as SD3 trains
        x_t = (1 - t) * x_0 + t * eps
        v = transformer(hidden_states=x_t, timestep=1000 * t.flatten(), encoder_hidden_states=embeds,
                        pooled_projections=pooled).sample
        loss = F.mse_loss(v, eps - x_0)                               # rectified flow: the velocity eps - x_0
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps:
            log(f"transformer step {step}/{steps}  velocity mse {loss.item():.4f}")
        if eval_every and (step % eval_every == 0 or step == steps):
            for module in (transformer, pipe.text_encoder, pipe.text_encoder_2):
                module.eval()
            soft, hard = evaluate(pipe)
            log(f"transformer step {step}: prompt alignment {100 * soft:.1f} (soft), {100 * hard:.1f}% fully right")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m toy_model.make_flow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(HERE, "flow"), help="pipeline directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    parser.add_argument("--steps", type=int, default=3000, help="transformer + text encoders training steps")
    parser.add_argument("--batch-size", type=int, default=32, help="images per training step")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    parser.add_argument("--shift", type=float, default=1.0, help="the scheduler's timestep shift (SD3 at 1024 px: 3)")
    parser.add_argument("--eval-every", type=int, default=500, help="measure prompt alignment every N steps")
    opts = parser.parse_args(argv)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(tmp, WORDS)
        vae, text_encoders, transformer = make_models(tokenizer)
        log(f"parameters: text encoders 2 x {sum(p.numel() for p in text_encoders[0].parameters()):,}, transformer "
            f"{sum(p.numel() for p in transformer.parameters()):,}")
        pipe = make_pipeline(vae, text_encoders, tokenizer, transformer, opts.shift)
        train(pipe, rng, opts.steps, opts.batch_size, opts.lr, log, opts.eval_every)
        del pipe.unet  # the alias is load_pipeline's, not a component to save
        pipe.save_pretrained(opts.output, safe_serialization=True)
    log(f"saved {opts.output}")


if __name__ == "__main__":
    main()
