"""Sampling trajectories and recomputing their log-probs for training, on a tiny pipeline."""
import pytest
import torch

import common

PROMPTS = ["a cat", "a dog", "a photo of a horse", "a red circle"]


def load(tiny_dir, mixed_precision="no", num_steps=6, guidance_scale=5.0):
    pipe, params, autocast = common.load_pipeline(tiny_dir, "cpu", mixed_precision, lora_rank=4)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); give it weights so the test covers it
        for p in params:
            p.normal_(0, 0.05)
    return common.Policy(pipe, common.encode_prompts(pipe, [""]), num_steps, guidance_scale, 1.0, autocast), params


def test_tokenizer_spells_whole_words(tiny_dir):
    policy, _ = load(tiny_dir)
    tokenizer = policy.pipe.tokenizer
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a photo of a cat").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "<|endoftext|>"]


def test_trajectory_shapes_and_consistency(tiny_dir):
    policy, _ = load(tiny_dir)
    embeds = common.encode_prompts(policy.pipe, PROMPTS)
    traj = common.sample_trajectories(policy, embeds, torch.Generator().manual_seed(0), progress=False)
    assert traj.images.shape == (4, 3, 32, 32) and 0 <= traj.images.min() and traj.images.max() <= 1
    assert traj.latents.shape == (4, 7, 4, 16, 16) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (4, 6) and torch.isfinite(traj.log_probs).all()
    # SD's leading spacing with steps_offset 1: 1000 // 6 = 166 apart, ending at 1
    assert traj.timesteps.tolist() == [831, 665, 499, 333, 167, 1]
    assert torch.equal(traj.prompt_embeds, embeds)
    # the images are the decoded final latents
    torch.testing.assert_close(traj.images, common.decode(policy.pipe, traj.latents[:, -1]))


def test_given_initial_noise_is_shared_and_trajectories_then_differ(tiny_dir):
    policy, _ = load(tiny_dir, num_steps=5)
    embeds = common.encode_prompts(policy.pipe, ["a cat"] * 2)
    x_T = torch.randn(1, 4, 16, 16).expand(2, -1, -1, -1)
    traj = common.sample_trajectories(policy, embeds, torch.Generator().manual_seed(0), latents=x_T, progress=False)
    assert torch.equal(traj.latents[0, 0], traj.latents[1, 0])
    assert not torch.allclose(traj.latents[0, 1:], traj.latents[1, 1:])


@pytest.mark.parametrize("guidance_scale, batch", [(5.0, 8), (1.0, 4)])
def test_one_batched_unet_call_per_step(tiny_dir, guidance_scale, batch):
    """Classifier-free guidance runs the conditional and unconditional halves in a single UNet call; without
    guidance (w = 1) only the conditional half runs."""
    policy, _ = load(tiny_dir, num_steps=5, guidance_scale=guidance_scale)
    calls = []
    handle = policy.pipe.unet.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    embeds = common.encode_prompts(policy.pipe, PROMPTS)
    common.sample_trajectories(policy, embeds, torch.Generator().manual_seed(0), progress=False)
    handle.remove()
    assert calls == [batch] * 5


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_guidance_combines_conditional_and_unconditional(tiny_dir, guidance_scale):
    policy, _ = load(tiny_dir, guidance_scale=guidance_scale)
    embeds, negative = common.encode_prompts(policy.pipe, PROMPTS[:2]), policy.negative_embeds
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(500)
    with torch.no_grad():
        cond = policy.pipe.unet(x, t, encoder_hidden_states=embeds).sample
        uncond = policy.pipe.unet(x, t, encoder_hidden_states=negative.expand(2, -1, -1)).sample
        guided = common.guided_noise_pred(policy, x, t, embeds)
    torch.testing.assert_close(guided, uncond + guidance_scale * (cond - uncond), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
def test_stored_log_probs_equal_recomputed(tiny_dir, mixed_precision):
    """Importance ratio 1 before any update: training re-scores exactly the stored steps, in other batches and
    with per-sample timesteps, as ddpo.py does."""
    policy, _ = load(tiny_dir, mixed_precision, num_steps=8)
    embeds = common.encode_prompts(policy.pipe, PROMPTS)
    traj = common.sample_trajectories(policy, embeds, torch.Generator().manual_seed(0), progress=False)
    steps = torch.stack([torch.randperm(8) for _ in range(4)])  # (B, T): each sample its own order
    for idx in (torch.tensor([2, 0]), torch.tensor([3, 1])):
        for j in range(8):
            s = steps[idx, j]
            with torch.no_grad():
                log_probs = common.log_prob(policy, traj, idx, s)
            ratio = torch.exp(log_probs - traj.log_probs[idx, s])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_recomputed_log_probs_have_gradients_for_lora_only(tiny_dir):
    policy, params = load(tiny_dir, num_steps=4)
    embeds = common.encode_prompts(policy.pipe, PROMPTS[:2])
    traj = common.sample_trajectories(policy, embeds, torch.Generator().manual_seed(0), progress=False)
    common.log_prob(policy, traj, torch.arange(2), 1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    pipe = policy.pipe
    assert all("lora" in n for n, p in pipe.unet.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_reference_model_switches_lora_off(tiny_dir):
    policy, _ = load(tiny_dir)
    pipe = policy.pipe
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
    from plumbing import bookkeeping
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
    bookkeeping.save_weights(pipe, str(tmp_path))
    fresh = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(400)
    emb = common.encode_prompts(pipe, ["a cat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, t, encoder_hidden_states=emb).sample,
                                   pipe.unet(x, t, encoder_hidden_states=emb).sample, atol=1e-5, rtol=1e-4)


def test_minibatches_cut_steps_then_batches():
    order = torch.arange(10)
    steps = common.minibatches(order, batch_size=3, step_size=4)
    assert [[b.tolist() for b in step] for step in steps] == [[[0, 1, 2], [3]], [[4, 5, 6], [7]], [[8, 9]]]
    assert common.minibatches(torch.arange(0), 2, 0) == []


def test_the_shipped_toy_model_loads_and_samples_in_plain_diffusers():
    """What a student does in a notebook: no dtype, no scheduler, no project code."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(common.TOY_MODEL)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a small red circle", num_inference_steps=3, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
