"""The shapes world: one coloured shape on a light background, captioned like "a small red circle".

Everything the world is lives here: its colours, shapes and sizes, the renderer that draws its training images
(toy_model/make.py), and the pixel detector with the rewards built on it. The rewards read pixels with
fixed rules (no learned weights), so a student can check every number by hand. Each attribute gets a soft score
in [0, 1], so a sample that is nearly right earns nearly full marks: dense rewards teach faster than
all-or-nothing ones. The scripts reach the rewards by name (`--reward shapes_correct`, through rewards.py) or as
`toy_model.world:shapes_correct`.
"""
import numpy as np
import torch
from PIL import Image, ImageDraw

from common import UserError

BACKGROUND = (0.92, 0.92, 0.92)
COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.15, 0.65, 0.2), "blue": (0.15, 0.3, 0.85), "yellow": (0.95, 0.8, 0.1)}
# how much of its bounding box each shape fills, as measured on rendered 32 px images (exactly: pi/4, 1 and
# 1/2; anti-aliased edges at the detector's threshold widen the small triangle's share)
SHAPES = {"circle": 0.78, "square": 0.99, "triangle": 0.57}
# the "radius" of each size as a share of the image width (the renderer draws it uniformly in this range); a
# circle's or triangle's bounding box is 2 r wide, a square's 1.8 r, so the boxes of the two sizes never overlap
SIZES = {"small": (0.12, 0.16), "large": (0.23, 0.28)}
SIZE_THRESHOLD = 0.39   # the detector's boundary between the sizes: box extent / image width (12.5 px at 32)
WORDS = ["a", *SIZES, *COLOURS, *SHAPES]


# ---------------------------------------------------------------------------------------------------------
# The data: rendered shapes and their captions
# ---------------------------------------------------------------------------------------------------------

def render(colour, shape, size, rng, resolution=32, supersample=4):
    """One anti-aliased image (H, W, 3) uint8 of a shape of the given colour and size, at a random place."""
    s = supersample
    image = Image.new("RGB", (resolution * s, resolution * s), tuple(int(255 * c) for c in BACKGROUND))
    draw = ImageDraw.Draw(image)
    r = rng.uniform(*SIZES[size]) * resolution                       # "radius": 3.8-5.1 or 7.4-9 px at 32 px
    cx, cy = rng.uniform(r + 1, resolution - r - 1, size=2)
    fill = tuple(int(255 * c) for c in COLOURS[colour])
    cx, cy, r = cx * s, cy * s, r * s
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.9 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:  # an upright triangle fills half its bounding box
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return np.asarray(image.resize((resolution, resolution), Image.BOX))


def random_attributes(rng):
    return (rng.choice(list(COLOURS)), rng.choice(list(SHAPES)), rng.choice(list(SIZES)))


def caption(colour, shape, size):
    return f"a {size} {colour} {shape}"


def all_prompts():
    return [caption(c, s, size) for size in SIZES for c in COLOURS for s in SHAPES]


# ---------------------------------------------------------------------------------------------------------
# The detector and the rewards
# ---------------------------------------------------------------------------------------------------------

def parse_shape_prompt(prompt):
    """The attributes a shapes-world prompt names: {'colour': ..., 'shape': ..., 'size': ...} (any may be absent)."""
    words = prompt.lower().replace(",", " ").split()
    named = {}
    for key, vocabulary in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES)):
        found = [w for w in words if w in vocabulary]
        if found:
            named[key] = found[0]
    return named


def detect_shapes(images, threshold=0.25):
    """Read each image's shape with fixed rules. Returns a list of dicts with, per image:
    'mask_fraction' (share of pixels off the background), and soft probabilities 'colour', 'shape', 'size'
    (dicts over the world's values), or None where the image shows no shape at all."""
    x = images.detach().float().cpu().clamp(0, 1)                            # (B, 3, H, W)
    B, _, H, W = x.shape
    background = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    mask = (x - background).norm(dim=1) > threshold                          # (B, H, W) foreground
    palette = torch.tensor(list(COLOURS.values()))                           # (K, 3)
    results = []
    for i in range(B):
        m = mask[i]
        area = int(m.sum())
        if area < 4:
            results.append(None)
            continue
        # colour: mean foreground colour, softmax over minus its distance to each palette colour (scale 0.1)
        mean_colour = x[i][:, m].mean(dim=1)
        colour_p = torch.softmax(-(palette - mean_colour).norm(dim=1) / 0.1, dim=0)
        # shape: how much of its bounding box the shape fills, against SHAPES, softmax with scale 0.05
        rows, cols = m.any(dim=1).nonzero(), m.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = area / float(box)
        shape_p = torch.softmax(-torch.tensor([abs(fill - f) for f in SHAPES.values()]) / 0.05, dim=0)
        # size: the longer side of the bounding box against SIZE_THRESHOLD, a sigmoid with scale 1 px
        extent = max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1
        large = torch.sigmoid(torch.tensor((extent - SIZE_THRESHOLD * W) / 1.0))
        results.append({"mask_fraction": area / (H * W), "fill": fill, "extent": extent / W,
                        "colour": dict(zip(COLOURS, colour_p.tolist())),
                        "shape": dict(zip(SHAPES, shape_p.tolist())),
                        "size": {"small": float(1 - large), "large": float(large)}})
    return results


def shape_scores(images, prompts):
    """(soft, hard, right) per image: soft is the mean over the prompt's named attributes of the detector's
    probability of the named value; right is the share of named attributes whose most probable value is the
    named one (0, 1/3, 2/3 or 1), and hard is 1 where all of them are."""
    soft, right = [], []
    for detected, prompt in zip(detect_shapes(images), prompts):
        named = parse_shape_prompt(prompt)
        if not named:
            raise UserError(f"the shapes rewards need prompts like 'a small red circle'; got {prompt!r}.")
        if detected is None:
            soft.append(0.0), right.append(0.0)
            continue
        soft.append(float(np.mean([detected[k][v] for k, v in named.items()])))
        right.append(float(np.mean([max(detected[k], key=detected[k].get) == v for k, v in named.items()])))
    right = np.array(right, dtype=np.float32)
    return np.array(soft, dtype=np.float32), (right == 1).astype(np.float32), right


def shapes_alignment(images, prompts):
    """Prompt alignment in the shapes world, dense, in [0, 1] (see shape_scores)."""
    return shape_scores(images, prompts)[0]


def shapes_correct(images, prompts):
    """Prompt alignment as a person would count it: the share of the prompt's colour, shape and size drawn right.

    Coarser than shapes_alignment, whose small differences between two images of one prompt (a slightly rounder
    square) are mostly noise: compared in pairs, this one calls such images a tie, as a labeller would."""
    return shape_scores(images, prompts)[2]


def shape_area(images, prompts):
    """A DDPO-style objective in the shapes world: the share of the image the shape covers (bigger is better)."""
    return np.array([0.0 if d is None else d["mask_fraction"] for d in detect_shapes(images)], dtype=np.float32)
