"""Sampling trajectories and recomputing their log-probs for training, on a tiny pipeline."""
import pytest
import torch

import common

PROMPTS = ["a cat", "a dog", "a photo of a horse", "a red circle"]


def load(tiny_dir, mixed_precision="no"):
    pipe, params, autocast = common.load_pipeline(tiny_dir, "cpu", mixed_precision, lora_rank=4)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); give it weights so the test covers it
        for p in params:
            p.normal_(0, 0.05)
    return pipe, params, autocast


def test_tokenizer_spells_whole_words(tiny_dir):
    pipe, _, _ = load(tiny_dir)
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a photo of a cat").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "<|endoftext|>"]


def test_trajectory_shapes_and_consistency(tiny_dir):
    pipe, _, autocast = load(tiny_dir)
    embeds, negative = common.encode_prompts(pipe, PROMPTS), common.encode_prompts(pipe, [""])
    traj = common.sample_trajectories(pipe, embeds, negative, 6, 1.0, 5.0, torch.Generator().manual_seed(0),
                                      autocast=autocast, progress=False)
    assert traj.images.shape == (4, 3, 32, 32) and 0 <= traj.images.min() and traj.images.max() <= 1
    assert traj.latents.shape == (4, 7, 4, 16, 16) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (4, 6) and torch.isfinite(traj.log_probs).all()
    # SD's leading spacing with steps_offset 1: 1000 // 6 = 166 apart, ending at 1
    assert traj.timesteps.tolist() == [831, 665, 499, 333, 167, 1]
    assert torch.equal(traj.prompt_embeds, embeds)
    # the images are the decoded final latents
    torch.testing.assert_close(traj.images, common.decode(pipe, traj.latents[:, -1]))


def test_given_initial_noise_is_shared_and_trajectories_then_differ(tiny_dir):
    pipe, _, _ = load(tiny_dir)
    embeds, negative = common.encode_prompts(pipe, ["a cat"] * 2), common.encode_prompts(pipe, [""])
    x_T = torch.randn(1, 4, 16, 16).expand(2, -1, -1, -1)
    traj = common.sample_trajectories(pipe, embeds, negative, 5, 1.0, 5.0, torch.Generator().manual_seed(0),
                                      latents=x_T, progress=False)
    assert torch.equal(traj.latents[0, 0], traj.latents[1, 0])
    assert not torch.allclose(traj.latents[0, 1:], traj.latents[1, 1:])


def test_one_batched_unet_call_per_step(tiny_dir):
    """Classifier-free guidance runs the conditional and unconditional halves in a single UNet call."""
    pipe, _, _ = load(tiny_dir)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    embeds, negative = common.encode_prompts(pipe, PROMPTS), common.encode_prompts(pipe, [""])
    common.sample_trajectories(pipe, embeds, negative, 5, 1.0, 5.0, torch.Generator().manual_seed(0), progress=False)
    handle.remove()
    assert calls == [8] * 5


def test_guidance_combines_conditional_and_unconditional(tiny_dir):
    pipe, _, _ = load(tiny_dir)
    embeds, negative = common.encode_prompts(pipe, PROMPTS[:2]), common.encode_prompts(pipe, [""])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(500)
    with torch.no_grad():
        cond = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        uncond = pipe.unet(x, t, encoder_hidden_states=negative.expand(2, -1, -1)).sample
        guided = common.guided_noise_pred(pipe, x, t, embeds, negative, 5.0)
    torch.testing.assert_close(guided, uncond + 5.0 * (cond - uncond), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
def test_stored_log_probs_equal_recomputed(tiny_dir, mixed_precision):
    """Importance ratio 1 before any update: training re-scores exactly the stored steps, in other batches and
    with per-sample timesteps, as ddpo.py does."""
    pipe, _, autocast = load(tiny_dir, mixed_precision)
    embeds, negative = common.encode_prompts(pipe, PROMPTS), common.encode_prompts(pipe, [""])
    traj = common.sample_trajectories(pipe, embeds, negative, 8, 1.0, 5.0, torch.Generator().manual_seed(0),
                                      autocast=autocast, progress=False)
    steps = torch.stack([torch.randperm(8) for _ in range(4)])  # (B, T): each sample its own order
    for idx in (torch.tensor([2, 0]), torch.tensor([3, 1])):
        for j in range(8):
            s = steps[idx, j]
            with torch.no_grad():
                log_probs = common.recompute_log_probs(pipe, traj.latents[idx, s], traj.latents[idx, s + 1],
                                                       traj.timesteps[s], embeds[idx], negative, 5.0, 1.0, autocast)
            ratio = torch.exp(log_probs - traj.log_probs[idx, s])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_recomputed_log_probs_have_gradients_for_lora_only(tiny_dir):
    pipe, params, _ = load(tiny_dir)
    embeds, negative = common.encode_prompts(pipe, PROMPTS[:2]), common.encode_prompts(pipe, [""])
    traj = common.sample_trajectories(pipe, embeds, negative, 4, 1.0, 5.0, torch.Generator().manual_seed(0),
                                      progress=False)
    log_probs = common.recompute_log_probs(pipe, traj.latents[:, 1], traj.latents[:, 2], traj.timesteps[[1, 1]],
                                           embeds, negative, 5.0, 1.0)
    log_probs.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all("lora" in n for n, p in pipe.unet.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_reference_model_switches_lora_off(tiny_dir):
    pipe, _, _ = load(tiny_dir)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor(300)
    emb = common.encode_prompts(pipe, ["a cat"])
    fresh, _, _ = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=0)
    with torch.no_grad():
        lora_out = pipe.unet(x, t, encoder_hidden_states=emb).sample
        with common.reference_model(pipe):
            ref_out = pipe.unet(x, t, encoder_hidden_states=emb).sample
        base_out = fresh.unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(ref_out, base_out)
    assert not torch.allclose(lora_out, base_out)


def test_cross_attention_lora_adapts_only_the_layers_that_read_the_prompt_and_loads_in_diffusers(tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    whole, every, _ = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=4)
    adapted = [n for n, p in whole.unet.named_parameters() if p.requires_grad]
    assert any(".attn1." in n for n in adapted) and any(".attn2." in n for n in adapted)  # the default: both
    pipe, params, _ = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=4, lora_targets="cross-attention")
    names = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert names and all(".attn2." in n and "lora" in n for n in names)
    assert 0 < len(params) < len(every)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    common.save_weights(pipe, str(tmp_path))
    fresh = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(400)
    emb = common.encode_prompts(pipe, ["a cat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, t, encoder_hidden_states=emb).sample,
                                   pipe.unet(x, t, encoder_hidden_states=emb).sample, atol=1e-5, rtol=1e-4)
