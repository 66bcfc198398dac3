"""Rewards: r(x_0, c) for a batch of images and their prompts, by the name a user gives with --reward.

A reward is a function f(images, prompts) of images as a float tensor (B, 3, H, W) in [0, 1] and their B prompts,
returning B numbers (higher is better). Give one by name (REWARDS below), a weighted mix of them
("0.7*pickscore+0.3*aesthetic"), or your own as `module:function`.
"""
import functools
import importlib
import io
import os
import re
import sys
import tempfile
import traceback

import numpy as np
import torch
from PIL import Image

from common import UserError
from plumbing import distributed
from toy_model import world as shapes_world


def to_uint8(images):
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8 numpy array."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def jpeg_kb(images, quality=95):
    """Size in kB of each image saved as JPEG at quality 95 (DDPO Sec. 6.1)."""
    sizes = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return np.array(sizes, dtype=np.float32)


def jpeg_compressibility(images, prompts):
    """DDPO's compressibility reward: minus the JPEG size in kB (DDPO Sec. 6.1)."""
    return -jpeg_kb(images)


def jpeg_incompressibility(images, prompts):
    """DDPO's incompressibility reward: the JPEG size in kB (DDPO Sec. 6.1)."""
    return jpeg_kb(images)


# ---- Learned rewards: CLIP models from the Hugging Face Hub, each loaded once per run --------------------------------

# where each model comes from: a hub id, or "hub id:file" for a single file. An environment variable of the same
# name points it at a local copy instead (a directory saved with save_pretrained, or the file): docs/rewards.md
SOURCES = {"REWARD_AESTHETIC_CLIP": "openai/clip-vit-large-patch14",
           "REWARD_AESTHETIC_HEAD": "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth",
           "REWARD_CLIP_SCORE_MODEL": "openai/clip-vit-large-patch14",
           "REWARD_PICKSCORE_MODEL": "yuvalkirstain/PickScore_v1",
           "REWARD_PICKSCORE_PROCESSOR": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
           "REWARD_HPSV2_MODEL": "xswu/HPSv2:HPS_v2.1_compressed.pt",
           "REWARD_HPSV2_CONFIG": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}


def source(key):
    return os.environ.get(key) or SOURCES[key]


def loading(key, load):
    """Run load(where) on the source of `key`; a failure is one sentence that says how to fix it."""
    where = source(key)
    try:
        return load(where)
    except UserError:
        raise
    except Exception as e:  # transformers and huggingface_hub raise OSError, ValueError or their own errors
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not load the reward model {where!r} ({why}); download it once with network "
                        f"(docs/rewards.md), or set {key} to a local copy.")


def hub_file(where):
    """A local file, or "hub id:file" downloaded once into the Hugging Face cache: its path."""
    if os.path.isfile(where):
        return where
    from huggingface_hub import hf_hub_download
    repo, filename = where.split(":")
    return hf_hub_download(repo, filename)


def loading_dtype(where, device):
    """Say which reward model loads (its download's progress follows, the first time); its dtype: half on a GPU."""
    print(f"loading the reward model {where} (the first time, the hub downloads it)", flush=True)
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_clip(model_key, processor_key, device):
    """A CLIP model, frozen, in half precision on a GPU, and its processor: loaded once per run and device."""
    return _load_clip(model_key, processor_key, device, source(model_key), source(processor_key))


@functools.lru_cache(maxsize=None)
def _load_clip(model_key, processor_key, device, *sources):  # (the sources are in the cache's key)
    from transformers import AutoProcessor, CLIPModel
    dtype = loading_dtype(source(model_key), device)
    model = loading(model_key, lambda where: CLIPModel.from_pretrained(where, dtype=dtype))
    processor = loading(processor_key, AutoProcessor.from_pretrained)
    return model.to(device).eval().requires_grad_(False), processor


class AestheticHead(torch.nn.Module):
    """The LAION aesthetic predictor v2's head: linear layers 768-1024-128-64-16-1 (dropout between, inactive in
    eval; no activations), on the L2-normalised CLIP ViT-L/14 image embedding (DDPO Sec. 6.1)."""
    def __init__(self):
        super().__init__()
        drop = torch.nn.Dropout
        self.layers = torch.nn.Sequential(torch.nn.Linear(768, 1024), drop(0.2), torch.nn.Linear(1024, 128), drop(0.2),
                                          torch.nn.Linear(128, 64), drop(0.1), torch.nn.Linear(64, 16),
                                          torch.nn.Linear(16, 1))

    def forward(self, embeds):
        return self.layers(embeds)


def load_aesthetic_head(device):
    """The head's weights: a plain state dict, read with weights_only=True (no code is unpickled)."""
    return _load_aesthetic_head(device, source("REWARD_AESTHETIC_HEAD"))


@functools.lru_cache(maxsize=None)
def _load_aesthetic_head(device, _source):
    def load(where):
        head = AestheticHead()
        head.load_state_dict(torch.load(hub_file(where), map_location="cpu", weights_only=True))
        return head
    return loading("REWARD_AESTHETIC_HEAD", load).to(device).eval().requires_grad_(False)


def open_clip_to_transformers(state):
    """An OpenCLIP CLIP's state dict -> the same network's in transformers' CLIPModel: renamed, each attention's
    packed q, k, v projection split in three, the two projection matrices transposed into linear layers."""
    names = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final": "text_model.final_layer_norm", "logit_scale": "logit_scale",
             "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "visual.class_embedding": "vision_model.embeddings.class_embedding",
             "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
             "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    out = {}
    for key, value in state.items():
        block = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$", key)
        if key in ("text_projection", "visual.proj"):   # used as x @ P: a linear layer's weight is P's transpose
            out[{"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}[key]] = value.T
        elif block and block[3] == "attn.in_proj":    # rows: q, then k, then v
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{'vision' if block[1] else 'text'}_model.encoder.layers.{block[2]}.self_attn.{name}_proj."
                    f"{block[4]}"] = part
        elif block:
            out[f"{'vision' if block[1] else 'text'}_model.encoder.layers.{block[2]}.{names.get(block[3], block[3])}"
                f".{block[4]}"] = value
        else:
            stem, _, last = key.rpartition(".")
            out[names[key] if key in names else f"{names.get(stem, stem)}.{last}"] = value
    return out


def load_hpsv2(device):
    """HPS v2.1: OpenCLIP weights (read with weights_only=True) in transformers' CLIPModel, whose configuration,
    tokenizer and image settings are those of the OpenCLIP ViT-H/14 it was fine-tuned from; once per run."""
    return _load_hpsv2(device, source("REWARD_HPSV2_MODEL"), source("REWARD_HPSV2_CONFIG"))


@functools.lru_cache(maxsize=None)
def _load_hpsv2(device, *sources):
    import pickle

    from transformers import AutoProcessor, CLIPConfig, CLIPModel
    dtype = loading_dtype(sources[0], device)

    def load(where):
        try:
            checkpoint = torch.load(hub_file(where), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"{where!r} holds more than tensors, and the project does not unpickle code to read it; "
                            f"give REWARD_HPSV2_MODEL a checkpoint of plain tensors.")
        return {k: v.to(dtype) for k, v in open_clip_to_transformers(checkpoint.get("state_dict", checkpoint)).items()}
    state = loading("REWARD_HPSV2_MODEL", load)
    config = loading("REWARD_HPSV2_CONFIG", CLIPConfig.from_pretrained)
    model, info = CLIPModel.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                            output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise UserError(f"{sources[0]!r} is not an OpenCLIP model of {sources[1]!r}'s shape (missing "
                        f"{sorted(info['missing_keys'])[:3]}, unexpected {sorted(info['unexpected_keys'])[:3]}).")
    processor = loading("REWARD_HPSV2_CONFIG", AutoProcessor.from_pretrained)
    return model.to(device).eval().requires_grad_(False), processor


def clip_pixels(images, processor, dtype):
    """Images (B, 3, H, W) in [0, 1] -> the model's pixel_values, in torch on the images' device: the shortest side
    resized as the processor says (bicubic), the centre cropped, normalised with the processor's mean and std."""
    config = processor.image_processor
    short, (crop_h, crop_w) = config.size["shortest_edge"], (config.crop_size["height"], config.crop_size["width"])
    h, w = images.shape[-2:]
    size = (max(crop_h, round(h * short / min(h, w))), max(crop_w, round(w * short / min(h, w))))
    x = torch.nn.functional.interpolate(images.float(), size=size, mode="bicubic", antialias=True).clamp(0, 1)
    top, left = (size[0] - crop_h) // 2, (size[1] - crop_w) // 2
    x = x[..., top:top + crop_h, left:left + crop_w]
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (config.image_mean, config.image_std))
    return ((x - mean) / std).to(dtype)


def clip_embeddings(model, processor, images, prompts=None):
    """L2-normalised CLIP image embeddings (B, D) and, with prompts, text embeddings (B, D), in float32."""
    image = model.visual_projection(model.vision_model(pixel_values=clip_pixels(images, processor, model.dtype))
                                    .pooler_output).float()
    if prompts is None:
        return image / image.norm(dim=-1, keepdim=True), None
    tokens = processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(images.device)
    text = model.text_projection(model.text_model(**tokens).pooler_output).float()
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def cosine(model, processor, images, prompts):
    """The cosine of each image's CLIP embedding and its prompt's, (B,)."""
    image, text = clip_embeddings(model, processor, images, prompts)
    return (image * text).sum(-1)


def in_batches(score, images, prompts, batch_size=32):
    """score(images, prompts) -> (b,) applied batch by batch, without gradients: (B,) on the CPU."""
    with torch.no_grad():
        return torch.cat([score(images[i:i + batch_size], prompts[i:i + batch_size]).cpu()
                          for i in range(0, len(images), batch_size)])


def aesthetic(images, prompts):
    """The LAION aesthetic predictor v2 (DDPO Sec. 6.1, D3PO): AestheticHead on the normalised CLIP ViT-L/14 image
    embedding, about 1 to 10."""
    model, processor = load_clip("REWARD_AESTHETIC_CLIP", "REWARD_AESTHETIC_CLIP", str(images.device))
    head = load_aesthetic_head(str(images.device))
    return in_batches(lambda x, p: head(clip_embeddings(model, processor, x)[0]).squeeze(1), images, prompts)


def clip_score(images, prompts):
    """CLIP score: 100 x the cosine of the CLIP ViT-L/14 image and prompt embeddings."""
    model, processor = load_clip("REWARD_CLIP_SCORE_MODEL", "REWARD_CLIP_SCORE_MODEL", str(images.device))
    return in_batches(lambda x, p: 100 * cosine(model, processor, x, p), images, prompts)


def pickscore(images, prompts):
    """PickScore v1 (PRDP's evaluation): CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences; its logit scale (about
    100) x the cosine of the image and prompt embeddings."""
    model, processor = load_clip("REWARD_PICKSCORE_MODEL", "REWARD_PICKSCORE_PROCESSOR", str(images.device))
    scale = model.logit_scale.exp().float()
    return in_batches(lambda x, p: scale * cosine(model, processor, x, p), images, prompts)


def hpsv2(images, prompts):
    """HPS v2.1 (PRDP's reward and evaluation): an OpenCLIP ViT-H/14 fine-tuned on human preferences (HPD v2); the
    cosine of the image and prompt embeddings, about 0.2 to 0.35."""
    model, processor = load_hpsv2(str(images.device))
    return in_batches(lambda x, p: cosine(model, processor, x, p), images, prompts)


# the models each learned reward needs (SOURCES' keys): checked when the reward is named, before any work
NEEDS = {aesthetic: ("REWARD_AESTHETIC_CLIP", "REWARD_AESTHETIC_HEAD"), clip_score: ("REWARD_CLIP_SCORE_MODEL",),
         pickscore: ("REWARD_PICKSCORE_MODEL", "REWARD_PICKSCORE_PROCESSOR"),
         hpsv2: ("REWARD_HPSV2_MODEL", "REWARD_HPSV2_CONFIG")}


def check_reachable(key):
    """Fail now, not after an epoch of sampling, if a model can be neither found locally nor fetched: a local copy
    must exist; a hub model's small files (its configs, or the head's file) come from the cache or the hub."""
    def fetch(where):
        if os.path.exists(where) or where.startswith((".", "/", "~")):
            if not os.path.exists(where):
                raise FileNotFoundError(f"{where} does not exist")
            return
        from huggingface_hub import hf_hub_download, snapshot_download
        repo, _, filename = where.partition(":")
        hf_hub_download(repo, filename) if filename else snapshot_download(repo, allow_patterns=["*.json"])
    loading(key, fetch)


# name -> a function (the shapes world's rewards live with the world, in toy_model/world.py)
REWARDS = {"jpeg_compressibility": jpeg_compressibility, "jpeg_incompressibility": jpeg_incompressibility,
           "aesthetic": aesthetic, "clip_score": clip_score, "pickscore": pickscore, "hpsv2": hpsv2,
           "shapes_alignment": shapes_world.shapes_alignment, "shapes_correct": shapes_world.shapes_correct,
           "shape_area": shapes_world.shape_area}

MIX_TERM = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*\*\s*([\w.:]+)\s*$")


def mix(name):
    """A weighted sum of rewards, "0.7*pickscore+0.3*aesthetic" (as PRDP trains on): a reward function whose
    `last_means` holds each part's mean over the last images it scored (logged as <part>_mean)."""
    weights = {}
    for term in name.split("+"):
        found = MIX_TERM.match(term)
        if not found:
            raise UserError(f"--reward {name!r}: {term.strip()!r} is not weight*reward; write a mix as "
                            f"0.7*pickscore+0.3*aesthetic.")
        weights[found.group(2)] = weights.get(found.group(2), 0.0) + float(found.group(1))
    parts = {part: get_reward_fn(part) for part in weights}

    def mixed(images, prompts):
        scores = {part: compute_rewards(fn, images, prompts, share=False) for part, fn in parts.items()}
        mixed.last_means = {part: float(s.double().mean()) for part, s in scores.items()}
        mixed.last_count = len(prompts)  # under torchrun, this process's share of the epoch's images
        return sum(weights[part] * s for part, s in scores.items())
    mixed.__name__, mixed.last_means, mixed.last_count = name, {}, 0
    return mixed


MIXES = {}  # mix string -> its reward function, one per run, so that its parts' means can be logged


def get_reward_fn(name):
    """A reward by name, a weighted mix, or 'module:function' for your own: fn(images (B,3,H,W) in [0,1], prompts)
    -> (B,)."""
    if "*" in name:
        if name not in MIXES:
            MIXES[name] = mix(name)
        return MIXES[name]
    fn = REWARDS.get(name, name)
    if callable(fn):
        for key in NEEDS.get(fn, ()):
            check_reachable(key)
        return fn
    if ":" not in fn:
        raise UserError(f"unknown reward {name!r}; known rewards are {', '.join(sorted(REWARDS))}, "
                        f"or give your own as module:function.")
    module_name, fn_name = fn.split(":", 1)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # a module of your own in the current directory is found, as python -m would
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError, ValueError, SyntaxError) as e:
        raise UserError(f"could not import reward {name!r}: {e} (module:function; the module must be in the current "
                        f"directory or on PYTHONPATH).")
    if not callable(fn):
        raise UserError(f"reward {name!r} is not a function.")
    return fn


def compute_rewards(reward_fn, images, prompts, epoch=None, share=True):
    """Call a reward function and check that it gave one finite number per image: a float32 tensor (B,) on the CPU.

    A NaN, an infinity or a None would make every trained weight NaN (DDPO, PRDP) or silently tie (D3PO), so the
    run stops here, before any update of the epoch: the last checkpoint stays as it was. Under torchrun (share),
    each process scores its share of the images, and every process gets all the scores."""
    if share and distributed.world() > 1:
        mine = torch.arange(len(prompts)).tensor_split(distributed.world())[distributed.rank()]
        scores = compute_rewards(reward_fn, images[mine.to(images.device)], [prompts[i] for i in mine], epoch, False)
        return torch.cat(distributed.gather_objects(scores))
    name = getattr(reward_fn, "__name__", repr(reward_fn))
    if torch.is_tensor(images) and not torch.isfinite(images).all():
        raise UserError(f"the sampled images{'' if epoch is None else f' of epoch {epoch}'} are not finite (NaN or "
                        f"infinite): the model's output overflowed (too high a --learning-rate or --guidance-scale, or "
                        f"fp16); the run stops before scoring them, and its last checkpoint is kept.")
    try:
        rewards = reward_fn(images, prompts)
    except UserError:
        raise
    except Exception as e:  # the user's own reward, or a model that failed: one sentence; the traceback in a file
        log = os.path.join(tempfile.gettempdir(), f"reward-error-{os.getpid()}.txt")
        with open(log, "w") as f:
            traceback.print_exc(file=f)
        what = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"the reward {name} raised {type(e).__name__}: {what} "
                        f"(the traceback is in {log}); the run stops, and its last checkpoint is kept.")
    try:
        rewards = torch.as_tensor(np.asarray(rewards.detach().cpu() if torch.is_tensor(rewards) else rewards,
                                             dtype=np.float32))
    except (TypeError, ValueError):
        raise UserError(f"the reward {name} returned something that is not numbers; it must be one number an image.")
    if rewards.shape != (len(prompts),):
        raise UserError(f"the reward {name} returned shape {tuple(rewards.shape)} for {len(prompts)} images; it must "
                        f"be one number each.")
    bad = int((~torch.isfinite(rewards)).sum())
    if bad:
        raise UserError(f"the reward {name} returned {bad} non-finite values (NaN or infinite) for {len(prompts)} "
                        f"images{'' if epoch is None else f' in epoch {epoch}'}; the run stops before training on "
                        f"them, and its last checkpoint is kept.")
    return rewards
