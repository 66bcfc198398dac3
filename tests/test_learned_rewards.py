"""The learned rewards (rewards.py: aesthetic, clip_score, pickscore) and weighted mixes, offline: tiny CLIP models
built from configs and saved with save_pretrained, and a random aesthetic head saved as a plain state dict, reached
through the same loading code as the hub ids (the REWARD_* environment variables name the local copies). Each
score is checked against transformers' own CLIPModel forward and the head's linear layers applied by hand."""
import pytest
import torch

import bookkeeping
import d3po
import ddpo
import prdp
import rewards
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
    reward = "aesthetic" if module is not ddpo else "0.5*aesthetic+0.5*clip_score"
    module.main(["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(tmp_path / "run"),
                 "--num-epochs", "1", "--num-steps", "2", "--resolution", "32", "--sample-batch-size", "4",
                 "--sample-batches-per-epoch", "1", "--train-batch-size", "2", "--gradient-accumulation-steps", "1", "--device", "cpu",
                 "--reward", reward, *flags])
    row = bookkeeping.read_metrics(str(tmp_path / "run"))[0]
    assert row["epoch"] == 0 and torch.isfinite(torch.tensor(row["reward_mean"]))
    if module is ddpo:  # a mix logs each part's mean
        assert {"aesthetic_mean", "clip_score_mean"} <= set(row)
