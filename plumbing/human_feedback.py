"""D3PO's human-feedback files, defined once: writing a round of samples for people to score, the label format and
its checks, and reading a scored round back. d3po.py uses it (--sample-only, --labels); so will a labelling page.

A round directory holds config.json (the run's settings), trajectories.safetensors (every latent and log-prob, so
training needs no resampling), sheets/NNNN.png (a contact sheet per prompt, images numbered #0, #1, ...),
labels_template.json, and labels/<name>.json, one per person. Label format: LABEL_HELP. The labelling page
(label.py) writes the same files, through label_file, check_entry and save_answer here.
"""
import json
import math
import os
import re

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from plumbing import bookkeeping
import common
from plumbing import distributed
from common import UserError

LABEL_HELP = ("a JSON list with one entry per prompt, in the order of the template: {\"prompt\": ..., "
              "\"scores\": [one number per image, higher is better]}")
# the settings that define a round's trajectories and its reference model; training on it must use them
ROUND_SETTINGS = ("model", "start_from", "resolution", "num_steps", "eta", "noise_level", "max_sequence_length",
                  "guidance_scale", "images_per_prompt")
ROUND_FILES = ("config.json", "prompts.txt", "trajectories.safetensors", "labels_template.json")
ANNOTATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # with RESERVED refused: a safe file name on every system
RESERVED = {"con", "prn", "aux", "nul", *(f"{port}{i}" for port in ("com", "lpt") for i in range(10))}  # Windows


def sample_round(policy, args, prompts):
    """Every prompt of the file, images_per_prompt times from one x_T; writes the trajectories, a numbered
    contact sheet per prompt and labels_template.json into args.output_dir."""
    if distributed.world() > 1:
        raise UserError("sample a round of human feedback with one process (python d3po.py --sample-only), not with "
                        "torchrun.")
    if os.path.isfile(os.path.join(args.output_dir, "trajectories.safetensors")):
        raise UserError(f"{args.output_dir!r} already holds a sampled round; choose another --output-dir.")
    os.makedirs(os.path.join(args.output_dir, "sheets"), exist_ok=True)
    bookkeeping.write_config(args)
    n = args.images_per_prompt
    _, samples = common.sample_epoch(policy, args, prompts, bookkeeping.epoch_generator(args.seed, 0),
                                     images_per_prompt=n, shared_noise=True, draw=False)
    template = []
    for p, prompt in enumerate(prompts):
        sheet = os.path.join("sheets", f"{p:04d}.png")
        bookkeeping.save_grid(samples.images[p * n:(p + 1) * n], [f"#{k}" for k in range(n)],
                              os.path.join(args.output_dir, sheet), columns=n, scale=max(1, 128 // args.resolution))
        template.append({"prompt": prompt, "sheet": sheet, "scores": [None] * n})
    tensors = {"latents": samples.latents, "log_probs": samples.log_probs, "timesteps": samples.timesteps,
               "images": samples.images}
    bookkeeping.atomic_write(os.path.join(args.output_dir, "trajectories.safetensors"),
                             lambda p: save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, p))
    bookkeeping.write_json(os.path.join(args.output_dir, "labels_template.json"), template)
    bookkeeping.atomic_write(os.path.join(args.output_dir, "prompts.txt"),
                             lambda p: open(p, "w", encoding="utf-8").write("".join(f"{q}\n" for q in prompts)))
    print(f"sampled {len(prompts)} prompts x {n} images into {args.output_dir}: label them on a page in the "
          f"browser, python -m plumbing.label {args.output_dir} (or copy labels_template.json to "
          f"labels/<your name>.json "
          f"and fill in the scores, higher is better)", flush=True)
    bookkeeping.release_output_dir(args)


def read_labels(round_dir, prompts, images_per_prompt):
    """Mean score of every image over the label files in round_dir/labels/ (one per annotator): (P, K)."""
    label_dir = os.path.join(round_dir, "labels")
    names = sorted(os.listdir(label_dir)) if os.path.isdir(label_dir) else []
    files = [f for f in names if f.endswith(".json") and os.path.isfile(os.path.join(label_dir, f))]
    if not files:
        raise UserError(f"--labels {round_dir!r}: no label files in {label_dir}/ (copy labels_template.json "
                        f"there as <name>.json and fill in the scores).")
    scores = [[e["scores"] for e in load_label_file(os.path.join(label_dir, name), prompts, images_per_prompt)]
              for name in files]
    return np.mean(np.array(scores, dtype=np.float64), axis=0)


def load_label_file(path, prompts, images_per_prompt, unlabelled_ok=False):
    """A label file's entries, one a prompt, each checked against the round (check_entry)."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}); it must be {LABEL_HELP}.")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; it must be {LABEL_HELP}.")
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); it must be {LABEL_HELP}.")
    if not isinstance(entries, list) or len(entries) != len(prompts):
        n = len(entries) if isinstance(entries, list) else "no list of"
        raise UserError(f"{path} has {n} prompts but the round has {len(prompts)}; it must be {LABEL_HELP}.")
    for p, (entry, prompt) in enumerate(zip(entries, prompts)):
        check_entry(entry, prompt, images_per_prompt, f"{path}, prompt {p}", unlabelled_ok)
    return entries


def check_entry(entry, prompt, images_per_prompt, where, unlabelled_ok=False):
    """One prompt's entry of a label file: {"prompt": the round's prompt, "scores": one number per image}; with
    unlabelled_ok, scores that are all null (a prompt not labelled yet, as in the template) pass too."""
    if not isinstance(entry, dict) or not isinstance(entry.get("scores"), list):
        raise UserError(f"{where}: the entry has no \"scores\" list; it must be {LABEL_HELP}.")
    if entry.get("prompt", prompt) != prompt:
        raise UserError(f"{where}: {entry['prompt']!r} is not the round's {prompt!r}.")
    where, scores = f"{where} ({prompt!r})", entry["scores"]
    if len(scores) != images_per_prompt:
        raise UserError(f"{where}: {len(scores)} scores for {images_per_prompt} images.")
    if all(s is None for s in scores):
        if unlabelled_ok:
            return
        raise UserError(f"{where} is not labelled yet (its scores are null): finish it, on the labelling page "
                        f"(python -m plumbing.label ROUND) or by hand.")
    for k, s in enumerate(scores):
        if not is_number(s):
            shown = repr(s) if len(repr(s)) < 40 else repr(s)[:20] + f"... ({len(repr(s))} characters)"
            raise UserError(f"{where}, image #{k}: score {shown} is not a number (or too large for one).")


def is_number(s):
    """A finite int or float (not a bool, and not an integer too large for a float: 10**400 is not a score)."""
    try:
        return not isinstance(s, bool) and isinstance(s, (int, float)) and math.isfinite(float(s))
    except OverflowError:
        return False


def label_file(round_dir, annotator):
    """The label file of one annotator, round_dir/labels/<annotator>.json; the name must be a safe file name."""
    if not isinstance(annotator, str) or not ANNOTATOR.fullmatch(annotator) or annotator.lower() in RESERVED:
        raise UserError(f"the annotator name {annotator!r} cannot name a file: use 1 to 64 letters, digits, '_' or "
                        f"'-', starting with a letter or digit, and not a name Windows reserves (con, nul, com1, ...).")
    written, folded = (os.path.join(round_dir, "labels", name + ".json") for name in (annotator, annotator.lower()))
    # Ann and ann: one file on every system (a file an earlier version wrote under Ann is still Ann's)
    return written if os.path.isfile(written) and not os.path.isfile(folded) else folded


def read_answers(round_dir, annotator, template):
    """An annotator's label file as a list of entries, or a copy of the template where there is none yet."""
    path = label_file(round_dir, annotator)
    if not os.path.isfile(path):
        return [dict(entry, scores=[None] * len(entry["scores"])) for entry in template]
    return load_label_file(path, [t["prompt"] for t in template], len(template[0]["scores"]), unlabelled_ok=True)


def save_answer(round_dir, annotator, template, p, scores):
    """Set prompt p's scores in the annotator's label file (null scores: not labelled) and write the file
    atomically, so that an interruption leaves the previous one whole. Returns the entries written."""
    entries = read_answers(round_dir, annotator, template)
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < len(entries):
        raise UserError(f"prompt {p!r} is not one of the round's {len(entries)} prompts (0 to {len(entries) - 1}).")
    entry = dict(entries[p], scores=scores)
    check_entry(entry, template[p]["prompt"], len(template[p]["scores"]), f"prompt {p}", unlabelled_ok=True)
    entries[p] = entry
    os.makedirs(os.path.join(round_dir, "labels"), exist_ok=True)
    bookkeeping.write_json(label_file(round_dir, annotator), entries)
    return entries


def round_config(round_dir, flag="--labels"):
    """The config of a round written by --sample-only; one sentence (naming `flag`) for a directory that is not."""
    missing = [f for f in ROUND_FILES if not os.path.isfile(os.path.join(round_dir, f))]
    if missing:
        raise UserError(f"{flag} {round_dir!r}: no {' or '.join(missing)} there, so it is not a round written by "
                        f"d3po.py --sample-only.")
    return bookkeeping.read_config(round_dir, flag)


def adopt_round_settings(args):
    """Training on a round uses the settings and prompts it was sampled with (ROUND_SETTINGS, its prompts.txt), and
    says which flags it replaced. (The round's directory is never written: it is a round, so bookkeeping refuses it
    as the --output-dir of a training run.)"""
    saved = round_config(args.labels)
    saved = {name: saved.get(name, getattr(args, name)) for name in ROUND_SETTINGS}  # a round older than a setting
    args.prompt_file = os.path.join(args.labels, "prompts.txt")
    changed = [f"--{n.replace('_', '-')} {saved[n]}" for n in ROUND_SETTINGS if getattr(args, n) != saved[n]]
    if changed:
        print(f"training on the round {args.labels} with its own settings: {', '.join(changed)}", flush=True)
    for name in ROUND_SETTINGS:
        setattr(args, name, saved[name])


def numerics(device, mixed_precision):
    """What a log-prob's exact value depends on beyond the model: the device type and the UNet's compute dtype."""
    return torch.device(device).type, str(common.resolve_precision(mixed_precision, device))


def load_round(policy, args):
    """The labelled round: (prompts, Trajectories, mean score of each image (n, 1), every pair of a prompt's images
    (m, 2), reference log-probs (n, T)).

    The round was sampled by the model this run starts from, which is the reference, so its stored log-probs ARE
    the reference log-probs when they are computed the same way; if this run's device type or mixed precision
    differs from the round's, they are computed again here, on this run's numerics."""
    try:
        with open(os.path.join(args.labels, "labels_template.json"), encoding="utf-8") as f:
            prompts = [entry["prompt"] for entry in json.load(f)]
        stored = load_file(os.path.join(args.labels, "trajectories.safetensors"))
    except Exception as e:  # a file cut short or edited by hand
        raise UserError(f"--labels {args.labels!r}: its labels_template.json or trajectories.safetensors cannot be "
                        f"read ({type(e).__name__}); sample the round again.")
    scores = read_labels(args.labels, prompts, args.images_per_prompt)
    if (scores == scores[:, :1]).all():
        raise UserError(f"--labels {args.labels!r}: in every prompt all the images have the same score, so no pair "
                        f"says which is better and there is nothing to train on; label some differences.")
    t = {k: v.to(policy.pipe.device) for k, v in stored.items()}
    batch_prompts = [p for p in prompts for _ in range(args.images_per_prompt)]
    embeds, pooled = zip(*[common.encode_prompts(policy.pipe, batch_prompts[i:i + args.sample_batch_size], pooled=True)
                           for i in range(0, len(batch_prompts), args.sample_batch_size)])
    samples = common.Trajectories(t["images"], t["latents"], t["log_probs"], t["timesteps"], torch.cat(embeds),
                                  None if pooled[0] is None else torch.cat(pooled))
    policy.pipe.scheduler.set_timesteps(args.num_steps, device=policy.pipe.device)  # the DDIM step needs the grid
    saved = round_config(args.labels)
    sampled_with, now = numerics(saved["device"], saved["mixed_precision"]), numerics(args.device, args.mixed_precision)
    ref_log_probs = samples.log_probs
    if sampled_with != now:
        print(f"the round was sampled with {sampled_with} (device, autocast dtype) and this run computes with {now}: "
              f"computing the reference log-probs again", flush=True)
        ref_log_probs = distributed.reference_log_probs(policy, samples, args.sample_batch_size)
    n = args.images_per_prompt
    i, j = torch.triu_indices(n, n, offset=1)
    offsets = n * torch.arange(len(prompts))[:, None]                                  # prompt p's images: p n ...
    pairs = torch.stack([offsets + i, offsets + j], -1).view(-1, 2)
    print(f"round {args.labels}: {len(prompts)} prompts", flush=True)
    return prompts, samples, torch.as_tensor(scores).view(-1, 1), pairs, ref_log_probs
