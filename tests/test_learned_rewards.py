"""The learned rewards (rewards.py: aesthetic, clip_score, pickscore, hpsv2) and weighted mixes, offline: tiny CLIP
models built from configs and saved with save_pretrained, a random aesthetic head saved as a plain state dict and a
random OpenCLIP-named checkpoint, reached through the same loading code as the hub ids (the REWARD_* environment
variables name the local copies). Each score is checked against transformers' own CLIPModel forward, the head's
linear layers applied by hand, or OpenCLIP's forward written out."""
import argparse

import pytest
import torch

from plumbing import bookkeeping
import d3po
import ddpo
import prdp
from plumbing import rewards
from tiny_pipeline import make_tiny_reward_models


@pytest.fixture(scope="session")
def tiny_reward_models(tmp_path_factory):
    return make_tiny_reward_models(str(tmp_path_factory.mktemp("reward-models")))


@pytest.fixture
def reward_models(tiny_reward_models, monkeypatch):
    for key, where in tiny_reward_models.items():
        monkeypatch.setenv(key, where)
    return tiny_reward_models


def clip_forward(where, images, prompts, resize=False):
    """transformers' own CLIPModel forward, its processor preparing the images (floats, no rescaling; images of the
    model's size need no resizing, and PIL's resize of floats rounds them to 8 bits)."""
    from transformers import CLIPModel, CLIPProcessor
    model, processor = CLIPModel.from_pretrained(where).eval(), CLIPProcessor.from_pretrained(where)
    inputs = processor(text=prompts, images=[im.permute(1, 2, 0).numpy() for im in images], do_rescale=False,
                       do_resize=resize, do_center_crop=resize, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs), model.logit_scale.exp()


def images_and_prompts(n=3, size=32):
    torch.manual_seed(1)
    return torch.rand(n, 3, size, size), ["a red circle", "a photo of a dog", "a blue square"][:n]


def test_clip_score_and_pickscore_are_the_models_scaled_cosines(reward_models):
    images, prompts = images_and_prompts()
    out, scale = clip_forward(reward_models["REWARD_CLIP_SCORE_MODEL"], images, prompts)
    cosine = out.logits_per_image.diagonal() / scale                   # transformers: logit_scale x cosine
    torch.testing.assert_close(rewards.clip_score(images, prompts), 100 * cosine, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(rewards.pickscore(images, prompts), out.logits_per_image.diagonal(), atol=2e-3,
                               rtol=1e-3)


def test_the_aesthetic_score_is_the_head_on_the_normalised_image_embedding(reward_models):
    images, prompts = images_and_prompts()
    out, _ = clip_forward(reward_models["REWARD_AESTHETIC_CLIP"], images, prompts)
    x = out.image_embeds                                              # CLIP's projection, L2-normalised
    state = torch.load(reward_models["REWARD_AESTHETIC_HEAD"], weights_only=True)
    for i in (0, 2, 4, 6, 7):                                         # the linear layers, by hand, in their order
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(rewards.aesthetic(images, prompts), x.squeeze(1), atol=1e-4, rtol=1e-3)


def open_clip_cosine(state, images, token_ids, eot, heads, mean, std):
    """OpenCLIP's CLIP forward written out on its state dict: residual attention blocks (torch's MultiheadAttention
    on the packed q, k, v), the image feature at the class token, the text feature at the end-of-text token (where
    OpenCLIP's argmax over token ids lands, the highest id in its vocabulary), each through its projection."""
    F = torch.nn.functional

    def blocks(x, tower, mask=None):
        i = 0
        while f"{tower}transformer.resblocks.{i}.ln_1.weight" in state:
            p = {k[len(f"{tower}transformer.resblocks.{i}."):]: v for k, v in state.items()
                 if k.startswith(f"{tower}transformer.resblocks.{i}.")}
            attention = torch.nn.MultiheadAttention(x.shape[-1], heads, batch_first=True)
            attention.load_state_dict({k[len("attn."):]: v for k, v in p.items() if k.startswith("attn.")})
            h = F.layer_norm(x, x.shape[-1:], p["ln_1.weight"], p["ln_1.bias"])
            x = x + attention(h, h, h, attn_mask=mask, need_weights=False)[0]
            h = F.layer_norm(x, x.shape[-1:], p["ln_2.weight"], p["ln_2.bias"])
            x = x + F.linear(F.gelu(F.linear(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])), p["mlp.c_proj.weight"],
                             p["mlp.c_proj.bias"])
            i += 1
        return x

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"])

    pixels = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    patches = F.conv2d(pixels, state["visual.conv1.weight"], stride=state["visual.conv1.weight"].shape[-1])
    x = patches.flatten(2).transpose(1, 2)                                   # (B, patches, width)
    x = torch.cat([state["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + state["visual.positional_embedding"]
    image = norm(blocks(norm(x, "visual.ln_pre"), "visual."), "visual.ln_post")[:, 0] @ state["visual.proj"]
    n = token_ids.shape[1]
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = norm(blocks(state["token_embedding.weight"][token_ids] + state["positional_embedding"][:n], "", causal),
             "ln_final")
    text = x[torch.arange(len(x)), eot] @ state["text_projection"]
    return torch.nn.functional.cosine_similarity(image, text)


def test_hpsv2_is_the_cosine_of_the_openclip_models_embeddings(reward_models):
    """The OpenCLIP checkpoint, renamed into transformers' CLIPModel, scores as OpenCLIP's own forward would (text
    padded to the full context, as OpenCLIP's tokenizer does; the reward pads to the longest prompt)."""
    from transformers import AutoProcessor
    images, prompts = images_and_prompts()
    state = torch.load(reward_models["REWARD_HPSV2_MODEL"], weights_only=True)["state_dict"]
    processor = AutoProcessor.from_pretrained(reward_models["REWARD_HPSV2_CONFIG"])
    tokens = processor.tokenizer(prompts, padding="max_length", return_tensors="pt").input_ids
    eot = (tokens == processor.tokenizer.eos_token_id).int().argmax(1)
    expected = open_clip_cosine(state, images, tokens, eot, heads=4, mean=processor.image_processor.image_mean,
                                std=processor.image_processor.image_std)
    score = rewards.hpsv2(images, prompts)
    assert expected.abs().min() > 0.05                                  # not a trivially small number
    torch.testing.assert_close(score, expected, atol=1e-4, rtol=1e-3)


def test_hpsv2_refuses_a_checkpoint_that_is_not_plain_tensors_or_not_openclip(reward_models, monkeypatch, tmp_path):
    pickled_code = tmp_path / "code.pt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, pickled_code)   # unpickling it runs argparse
    monkeypatch.setenv("REWARD_HPSV2_MODEL", str(pickled_code))
    with pytest.raises(rewards.UserError, match="does not unpickle code"):
        rewards.hpsv2(*images_and_prompts())
    state = torch.load(reward_models["REWARD_HPSV2_MODEL"], weights_only=True)["state_dict"]
    del state["visual.proj"]
    torch.save({"state_dict": state}, tmp_path / "short.pt")
    monkeypatch.setenv("REWARD_HPSV2_MODEL", str(tmp_path / "short.pt"))
    with pytest.raises(rewards.UserError, match="is not an OpenCLIP model of .* shape"):
        rewards.hpsv2(*images_and_prompts())


def test_hpsv2_matches_openclip_itself_where_it_is_installed(reward_models):
    """Where OpenCLIP installs (it needs torchvision, whose PyPI build needs a CUDA build of torch, so not in CI):
    its own model code on the same weights."""
    open_clip = pytest.importorskip("open_clip")
    from transformers import AutoProcessor
    state = torch.load(reward_models["REWARD_HPSV2_MODEL"], weights_only=True)["state_dict"]
    processor = AutoProcessor.from_pretrained(reward_models["REWARD_HPSV2_CONFIG"])
    model = open_clip.model.CLIP(16, open_clip.model.CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=8,
                                                                   image_size=32),
                                 open_clip.model.CLIPTextCfg(context_length=len(state["positional_embedding"]),
                                                             vocab_size=len(state["token_embedding.weight"]),
                                                             width=32, heads=4, layers=2)).eval()
    model.load_state_dict(state)
    images, prompts = images_and_prompts()
    tokens = processor.tokenizer(prompts, padding="max_length", return_tensors="pt").input_ids
    model.text_pool_type, model.text_eos_id = "eos", processor.tokenizer.eos_token_id  # the tiny vocabulary's EOT
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.image_processor.image_mean,
                                                            processor.image_processor.image_std))
    with torch.no_grad():
        image = model.encode_image((images - mean) / std, normalize=True)
        text = model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(rewards.hpsv2(images, prompts), (image * text).sum(-1), atol=1e-4, rtol=1e-3)


def test_images_of_another_size_are_resized_to_what_the_model_takes(reward_models):
    images, prompts = images_and_prompts(size=48)
    score = rewards.clip_score(images, prompts)
    out, scale = clip_forward(reward_models["REWARD_CLIP_SCORE_MODEL"], images, prompts, resize=True)
    assert score.shape == (3,) and torch.isfinite(score).all()
    # the processor resizes with PIL, the reward in torch: the same bicubic resize, up to its rounding
    torch.testing.assert_close(score, 100 * out.logits_per_image.diagonal() / scale, atol=0.5, rtol=0.02)


def test_a_mix_is_the_weighted_sum_of_its_parts_and_logs_their_means(reward_models):
    images, prompts = images_and_prompts()
    mixed = rewards.get_reward_fn("0.7*clip_score+0.3*aesthetic")
    expected = 0.7 * rewards.clip_score(images, prompts) + 0.3 * rewards.aesthetic(images, prompts)
    torch.testing.assert_close(rewards.compute_rewards(mixed, images, prompts), expected)
    assert set(mixed.last_means) == {"clip_score", "aesthetic"}
    assert mixed.last_means["aesthetic"] == pytest.approx(float(rewards.aesthetic(images, prompts).mean()), abs=1e-5)
    spaced = rewards.get_reward_fn("-1e-1 * clip_score + 2*jpeg_compressibility")
    torch.testing.assert_close(spaced(images, prompts), -0.1 * rewards.clip_score(images, prompts)
                               + 2 * torch.as_tensor(rewards.jpeg_compressibility(images, prompts)))


@pytest.mark.parametrize("bad, message", [("0.7*", "is not weight*reward"), ("aesthetic+0.3*clip_score",
                                                                              "is not weight*reward"),
                                          ("0.5*beauty+0.5*aesthetic", "unknown reward 'beauty'")])
def test_a_bad_mix_is_one_sentence(bad, message):
    with pytest.raises(rewards.UserError, match=message.replace("*", r"\*")):
        rewards.get_reward_fn(bad)


def test_a_reward_model_that_cannot_be_loaded_says_which_variable_points_at_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("REWARD_CLIP_SCORE_MODEL", str(tmp_path / "no-such-model"))
    with pytest.raises(rewards.UserError, match="set REWARD_CLIP_SCORE_MODEL to a local copy"):
        rewards.clip_score(*images_and_prompts())
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("REWARD_CLIP_SCORE_MODEL", str(tmp_path / "empty"))  # there, but no model in it
    with pytest.raises(rewards.UserError, match="set REWARD_CLIP_SCORE_MODEL to a local copy"):
        rewards.clip_score(*images_and_prompts())


@pytest.mark.parametrize("name, key", [("aesthetic", "REWARD_AESTHETIC_HEAD"), ("pickscore", "REWARD_PICKSCORE_MODEL"),
                                       ("hpsv2", "REWARD_HPSV2_MODEL"), ("hpsv2", "REWARD_HPSV2_CONFIG"),
                                       ("0.5*clip_score+0.5*aesthetic", "REWARD_CLIP_SCORE_MODEL")])
def test_an_unreachable_reward_model_is_refused_when_the_reward_is_named(reward_models, monkeypatch, tmp_path, name,
                                                                        key):
    """Before any model loads or any image is sampled: offline (the tests' HF_HUB_OFFLINE=1) and uncached, or a
    local copy that is not there."""
    assert rewards.get_reward_fn(name.split("*")[-1]) is not None  # the tiny copies are reachable
    monkeypatch.setenv(key, str(tmp_path / "missing"))
    with pytest.raises(rewards.UserError, match=f"set {key} to a local copy"):
        rewards.get_reward_fn(name)
    monkeypatch.setenv(key, "someone/not-cached-model")
    with pytest.raises(rewards.UserError, match="could not load the reward model 'someone/not-cached-model'"):
        rewards.get_reward_fn(name)


@pytest.mark.parametrize("module", [ddpo, d3po, prdp])
def test_each_script_trains_an_epoch_on_the_aesthetic_score(module, reward_models, tiny_dir, prompt_file, tmp_path):
    flags = {"d3po": [], "ddpo": [], "prdp": ["--images-per-prompt", "2"]}[module.__name__]
    reward = {"ddpo": "0.5*aesthetic+0.5*clip_score", "d3po": "aesthetic", "prdp": "0.7*hpsv2+0.3*aesthetic"}[
        module.__name__]
    module.main(["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(tmp_path / "run"),
                 "--num-epochs", "1", "--num-steps", "2", "--resolution", "32", "--sample-batch-size", "4",
                 "--sample-batches-per-epoch", "1", "--train-batch-size", "2", "--gradient-accumulation-steps", "1",
                 "--device", "cpu",
                 "--reward", reward, *flags])
    row = bookkeeping.read_metrics(str(tmp_path / "run"))[0]
    assert row["epoch"] == 0 and torch.isfinite(torch.tensor(row["reward_mean"]))
    if "*" in reward:  # a mix logs each part's mean
        assert {f"{part.split('*')[1]}_mean" for part in reward.split("+")} <= set(row)
