"""A tiny Stable Diffusion pipeline built from configs (random weights, no download), saved with save_pretrained.

Same architecture family and file layout as SD v1.5, so the real loading code runs: a two-block UNet with
cross-attention in the lower block, a two-block VAE (latents 4 x res/2 x res/2), a two-layer CLIP text encoder,
a CLIP byte-pair tokenizer whose merges spell whole words, and SD's DDIM scheduler configuration. Beside it
make_tiny_sd3_pipeline, a tiny Stable Diffusion 3 pipeline (a flow model) built the same way.
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for python benchmarks/tiny_pipeline.py
from toy_model.make import write_tokenizer  # noqa: E402

WORDS = ["a", "photo", "of", "cat", "dog", "horse", "red", "blue", "circle", "square"]


def make_tiny_pipeline(path, resolution=32, seed=0, prediction_type="epsilon"):
    """Build, save and return the path of a tiny random StableDiffusionPipeline directory."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(tempfile.mkdtemp(), WORDS)
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


def make_tiny_sd3_pipeline(path, resolution=32, seed=0):
    """Build, save and return the path of a tiny random StableDiffusion3Pipeline directory: a one-block SD3
    transformer (joint attention, pooled projections) on 4 x res/2 x res/2 latents, two CLIP text encoders with
    projections (their pooled outputs side by side are the transformer's pooled input), no T5 (SD3's pipeline then
    pads with zeros, as it allows), a VAE with SD3's shift and scaling factors, and SD3's flow-matching scheduler."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizers = [write_tokenizer(tempfile.mkdtemp(), WORDS) for _ in range(2)]
    text_encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=32, max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)) for tokenizer in tokenizers]
    transformer = SD3Transformer2DModel(sample_size=resolution // 2, patch_size=1, in_channels=4, out_channels=4,
                                        num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=resolution // 2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=resolution, shift_factor=0.0609, scaling_factor=1.5035,
                        use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0],
                                    text_encoder_2=text_encoders[1], tokenizer_2=tokenizers[1], text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.save_pretrained(path)
    return path


def make_tiny_reward_models(path, seed=0):
    """Tiny stand-ins for the learned rewards' models, saved where the REWARD_* environment variables can point
    (rewards.SOURCES): a CLIP with a projection of ViT-L/14's width (768) and its processor, and a random aesthetic
    head saved as a plain state dict, and an HPSv2-like OpenCLIP checkpoint. Returns {environment variable: local
    copy}."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from plumbing.rewards import AestheticHead
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(os.path.join(path, "tokenizer"), WORDS)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=tokenizer.model_max_length,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=2, num_attention_heads=4),
                        projection_dim=768, logit_scale_init_value=4.0)
    clip = os.path.join(path, "clip")
    CLIPModel(config).save_pretrained(clip)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(clip)
    head = AestheticHead()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save(head.state_dict(), os.path.join(path, "aesthetic-model.pth"))
    # HPSv2: a transformers configuration of an OpenCLIP-shaped CLIP (GELU, as ViT-H/14), and random weights under
    # OpenCLIP's names in a checkpoint laid out as HPSv2's ({"state_dict": ...})
    hps = os.path.join(path, "hps-config")
    config.text_config.hidden_act = config.vision_config.hidden_act = "gelu"
    config.text_config.intermediate_size = config.vision_config.intermediate_size = 4 * 32
    config.projection_dim = 16
    config.save_pretrained(hps)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(hps)
    state = open_clip_state(vocab=len(tokenizer), context=tokenizer.model_max_length, width=32, layers=2,
                            image_size=32, patch=8, embed_dim=16)
    torch.save({"epoch": 1, "state_dict": state}, os.path.join(path, "HPS_v2.1_compressed.pt"))
    return {"REWARD_AESTHETIC_CLIP": clip, "REWARD_AESTHETIC_HEAD": os.path.join(path, "aesthetic-model.pth"),
            "REWARD_CLIP_SCORE_MODEL": clip, "REWARD_PICKSCORE_MODEL": clip, "REWARD_PICKSCORE_PROCESSOR": clip,
            "REWARD_HPSV2_MODEL": os.path.join(path, "HPS_v2.1_compressed.pt"), "REWARD_HPSV2_CONFIG": hps}


def open_clip_state(vocab, context, width, layers, image_size, patch, embed_dim):
    """Random weights with the names and shapes of an OpenCLIP CLIP's state dict (text and image towers of the same
    width; packed attention projections; projections used as x @ P)."""
    def rand(*shape):
        return torch.randn(*shape) * 0.1

    state = {"token_embedding.weight": rand(vocab, width), "positional_embedding": rand(context, width),
             "text_projection": rand(width, embed_dim), "logit_scale": torch.tensor(4.6),
             "visual.conv1.weight": rand(width, 3, patch, patch), "visual.class_embedding": rand(width),
             "visual.positional_embedding": rand((image_size // patch) ** 2 + 1, width),
             "visual.proj": rand(width, embed_dim)}
    norms = ["ln_final", "visual.ln_pre", "visual.ln_post"]
    for tower in ("", "visual."):
        for i in range(layers):
            block = f"{tower}transformer.resblocks.{i}."
            norms += [block + "ln_1", block + "ln_2"]
            state.update({block + "attn.in_proj_weight": rand(3 * width, width),
                          block + "attn.in_proj_bias": rand(3 * width),
                          block + "attn.out_proj.weight": rand(width, width), block + "attn.out_proj.bias": rand(width),
                          block + "mlp.c_fc.weight": rand(4 * width, width), block + "mlp.c_fc.bias": rand(4 * width),
                          block + "mlp.c_proj.weight": rand(width, 4 * width), block + "mlp.c_proj.bias": rand(width)})
    for norm in norms:
        state[norm + ".weight"], state[norm + ".bias"] = 1 + rand(width), rand(width)
    return state


if __name__ == "__main__":
    print(make_tiny_pipeline(sys.argv[1] if len(sys.argv) > 1 else "tiny-sd"))
