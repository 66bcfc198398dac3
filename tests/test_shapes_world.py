"""The shapes world: renderer, pixel detector and rewards, tokenizer, and the toy-model training script."""
import numpy as np
import pytest
import torch

from plumbing import bookkeeping
import common
from plumbing import rewards
from toy_model import world as shapes_world

from toy_model import make as make_toy_model


def rendered(n, seed=0):
    rng = np.random.default_rng(seed)
    truth, images = [], []
    for _ in range(n):
        attributes = shapes_world.random_attributes(rng)
        truth.append(attributes)
        images.append(shapes_world.render(*attributes, rng))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255, truth


def test_detector_reads_rendered_images_at_least_95_percent_right():
    images, truth = rendered(500)
    detected = shapes_world.detect_shapes(images)
    for i, key in enumerate(("colour", "shape", "size")):
        right = np.mean([max(d[key], key=d[key].get) == t[i] for d, t in zip(detected, truth)])
        assert right >= 0.95, (key, right)
    prompts = [shapes_world.caption(*t) for t in truth]
    soft, hard, right = shapes_world.shape_scores(images, prompts)
    assert hard.mean() >= 0.95 and soft.mean() >= 0.9


def test_alignment_reward_is_dense_and_prompt_specific():
    images, truth = rendered(1, seed=3)
    colour, shape, size = truth[0]
    other_colour = next(c for c in shapes_world.COLOURS if c != colour)
    other_size = next(s for s in shapes_world.SIZES if s != size)
    full = shapes_world.shapes_alignment(images, [shapes_world.caption(colour, shape, size)])[0]
    one_wrong = shapes_world.shapes_alignment(images, [shapes_world.caption(other_colour, shape, size)])[0]
    two_wrong = shapes_world.shapes_alignment(images, [shapes_world.caption(other_colour, shape, other_size)])[0]
    assert full > 0.9 and 0.5 < one_wrong < 0.75 and 0.2 < two_wrong < 0.45  # about 1, 2/3 and 1/3
    # only the attributes a prompt names are scored
    assert shapes_world.shapes_alignment(images, [f"a {colour} shape"])[0] > 0.9


def test_blank_image_scores_zero():
    blank = torch.tensor(shapes_world.BACKGROUND).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert shapes_world.shapes_alignment(blank, ["a small red circle"])[0] == 0
    assert shapes_world.shape_area(blank, [""])[0] == 0


def test_prompts_that_name_nothing_are_refused():
    images, _ = rendered(1)
    with pytest.raises(common.UserError, match="prompts like 'a small red circle'"):
        shapes_world.shapes_alignment(images, ["a photo of a dog"])


def test_hand_checked_soft_scores():
    """A pure red 8 x 8 square: the detector's numbers, worked by hand from its rules."""
    x = torch.tensor(shapes_world.BACKGROUND).view(3, 1, 1).repeat(1, 32, 32)
    x[:, 10:18, 4:12] = torch.tensor(shapes_world.COLOURS["red"]).view(3, 1, 1)
    d = shapes_world.detect_shapes(x[None])[0]
    assert d["mask_fraction"] == pytest.approx(64 / 1024) and d["fill"] == pytest.approx(1.0)
    assert shapes_world.shape_area(x[None], [""])[0] == pytest.approx(64 / 1024)
    # size: extent 8 px against the boundary at 0.39 x 32 = 12.48 px, sigmoid with scale 1 px
    assert d["size"]["large"] == pytest.approx(1 / (1 + np.exp(-(8 - 12.48))), rel=1e-5)
    assert d["size"]["small"] == pytest.approx(1 - d["size"]["large"], rel=1e-6)
    # the colour is exactly red: distance 0 to red, softmax of -distance / 0.1
    palette = np.array(list(shapes_world.COLOURS.values()))
    expected = np.exp(-np.linalg.norm(palette - palette[0], axis=1) / 0.1)
    assert d["colour"]["red"] == pytest.approx(expected[0] / expected.sum(), rel=1e-5)


def test_tokenizer_loses_no_word_of_the_world(tmp_path):
    """Every prompt encodes to real tokens that spell it back (no word silently becomes <|endoftext|>), and
    different prompts encode differently, and every word of the world is one token (a merge made for one
    word, like "r e" for "red", must not split another, like "green")."""
    tokenizer = make_toy_model.write_tokenizer(str(tmp_path), shapes_world.WORDS)
    encodings = set()
    for prompt in shapes_world.all_prompts():
        ids = tokenizer(prompt).input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.eos_token_id not in ids[1:-1], prompt
        assert "".join(tokens[1:-1]).replace("</w>", " ").strip() == prompt
        encodings.add(tuple(ids))
    assert len(encodings) == 24
    whole = [w for w in shapes_world.WORDS
             if tokenizer.convert_ids_to_tokens(tokenizer(w).input_ids)[1:-1] == [w + "</w>"]]
    assert whole == shapes_world.WORDS


def test_prompt_file_lists_every_combination():
    prompts = bookkeeping.load_prompts("tutorials/shapes.txt")
    assert sorted(prompts) == sorted(shapes_world.all_prompts()) and len(prompts) == 24


def test_training_script_smoke(tmp_path):
    """A few steps of every stage, and the saved directory loads like Stable Diffusion does. The worker's thread
    count is left alone (it was once set to 2 here, and every later test of a `-n 2` worker then fought the other
    worker for the two cores: 10x slower)."""
    out = tmp_path / "toy"
    threads = torch.get_num_threads()
    make_toy_model.main(["--output", str(out), "--vae-steps", "2", "--unet-steps", "2", "--eval-every", "0",
                         "--batch-size", "4"])
    assert torch.get_num_threads() == threads
    pipe, params, _ = common.load_pipeline(str(out), "cpu", "no", lora_rank=4)
    assert pipe.resolution == 32 and pipe.vae_scale_factor == 2
    assert pipe.scheduler.config.set_alpha_to_one is False and pipe.scheduler.config.steps_offset == 1
    policy = common.Policy(pipe, common.encode_prompts(pipe, [""]), num_steps=3, guidance_scale=5.0, eta=1.0)
    images = common.evaluate(policy, ["a small red circle"], 0)
    assert images.shape == (1, 3, 32, 32)
    from safetensors.torch import load_file  # saved in float32, so plain diffusers samples it as it is
    assert {t.dtype for t in load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")).values()} == {
        torch.float32}


def test_correct_counts_the_named_attributes_drawn_right():
    images, truth = rendered(1, seed=3)
    colour, shape, size = truth[0]
    other_colour = next(c for c in shapes_world.COLOURS if c != colour)
    other_shape = next(s for s in shapes_world.SHAPES if s != shape)
    other_size = next(s for s in shapes_world.SIZES if s != size)
    prompts = [shapes_world.caption(colour, shape, size), shapes_world.caption(other_colour, shape, size),
               shapes_world.caption(other_colour, shape, other_size),
               shapes_world.caption(other_colour, other_shape, other_size)]
    got = shapes_world.shapes_correct(images.repeat(4, 1, 1, 1), prompts)
    np.testing.assert_allclose(got, [1, 2 / 3, 1 / 3, 0], atol=1e-6)
    assert rewards.get_reward_fn("shapes_correct") is shapes_world.shapes_correct


def test_flow_toy_maker_smoke(tmp_path):
    """A few steps of the flow toy's maker; the saved directory loads as Stable Diffusion 3 does, here and in plain
    diffusers, and its policy takes the flow SDE's step."""
    from diffusers import StableDiffusion3Pipeline
    from toy_model import make_flow
    out = tmp_path / "flow"
    threads = torch.get_num_threads()
    make_flow.main(["--output", str(out), "--steps", "2", "--eval-every", "0", "--batch-size", "4"])
    assert torch.get_num_threads() == threads
    pipe, _, _ = common.load_pipeline(str(out), "cpu", "no", lora_rank=4,
                                      max_sequence_length=make_flow.MAX_SEQUENCE_LENGTH)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.resolution == 32
    negative, negative_pooled = common.encode_prompts(pipe, [""], pooled=True)
    assert negative.shape[1] == pipe.tokenizer.model_max_length + make_flow.MAX_SEQUENCE_LENGTH  # CLIP's, then T5's zeros
    policy = common.Policy(pipe, negative, 3, 5.0, 0.7, negative_pooled=negative_pooled)
    assert common.evaluate(policy, ["a small red circle"], 0).shape == (1, 3, 32, 32)
    plain = StableDiffusion3Pipeline.from_pretrained(str(out), text_encoder_3=None, tokenizer_3=None)
    image = plain("a small red circle", num_inference_steps=2, height=32, width=32, output_type="pt",
                  max_sequence_length=make_flow.MAX_SEQUENCE_LENGTH).images
    assert image.shape == (1, 3, 32, 32)
