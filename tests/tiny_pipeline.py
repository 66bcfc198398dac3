"""A tiny Stable Diffusion pipeline built from configs (random weights, no download), saved with save_pretrained.

Same architecture family and file layout as SD v1.5, so the real loading code runs: a two-block UNet with
cross-attention in the lower block, a two-block VAE (latents 4 x res/2 x res/2), a two-layer CLIP text encoder,
a CLIP byte-pair tokenizer whose merges spell whole words, and SD's DDIM scheduler configuration.
"""
import json
import os

import torch

WORDS = ["a", "photo", "of", "cat", "dog", "horse", "red", "blue", "circle", "square"]


def bpe_merges(words):
    """Merges that build each word from its letters, left to right (the last letter carries '</w>')."""
    merges, vocab = [], []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.append(symbols[0])
    return merges, vocab


def write_tokenizer(path, words=WORDS, max_length=16):
    from transformers import CLIPTokenizer
    os.makedirs(path, exist_ok=True)
    letters = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz"))
    merges, merged = bpe_merges(words)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    tokens += [t for t in dict.fromkeys(merged) if t not in tokens]
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                         model_max_length=max_length)


def make_tiny_pipeline(path, resolution=32, seed=0, prediction_type="epsilon"):
    """Build, save and return the path of a tiny random StableDiffusionPipeline directory."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(os.path.join(path, "tokenizer_src"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=resolution)
    unet = UNet2DConditionModel(sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    # Stable Diffusion v1.5's scheduler settings
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys
    print(make_tiny_pipeline(sys.argv[1] if len(sys.argv) > 1 else "tiny-sd"))
