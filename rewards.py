"""Rewards: r(x_0, c) for a batch of images and their prompts, by the name a user gives with --reward.

A reward is a function f(images, prompts) of images as a float tensor (B, 3, H, W) in [0, 1] and their B prompts,
returning B numbers (higher is better). Give one by name (REWARDS below) or your own as `module:function`.
"""
import importlib
import io
import os
import sys

import numpy as np
import torch
from PIL import Image

from common import UserError


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


# name -> a function, or the module:function of one imported when first asked for (the shapes world's rewards
# live with the world, in tutorials/shapes_world.py)
REWARDS = {"jpeg_compressibility": jpeg_compressibility, "jpeg_incompressibility": jpeg_incompressibility,
           "shapes_alignment": "tutorials.shapes_world:shapes_alignment",
           "shapes_correct": "tutorials.shapes_world:shapes_correct",
           "shape_area": "tutorials.shapes_world:shape_area"}


def get_reward_fn(name):
    """A reward by name, or 'module:function' for your own: fn(images (B,3,H,W) in [0,1], prompts) -> (B,)."""
    fn = REWARDS.get(name, name)
    if callable(fn):
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


def compute_rewards(reward_fn, images, prompts, epoch=None):
    """Call a reward function and check that it gave one finite number per image: a float32 tensor (B,) on the CPU.

    A NaN, an infinity or a None would make every trained weight NaN (DDPO, PRDP) or silently tie (D3PO), so the
    run stops here, before any update of the epoch: the last checkpoint stays as it was."""
    name = getattr(reward_fn, "__name__", repr(reward_fn))
    rewards = reward_fn(images, prompts)
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
