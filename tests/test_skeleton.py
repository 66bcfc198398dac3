"""The three scripts share one skeleton, so that `diff ddpo.py d3po.py` shows the algorithm and little else: the
same shared flags with the same help texts, the same sections and plumbing calls in the same order, a drift
budget whose every changed line is the algorithm's own, the same outputs, no more UNet calls than each algorithm
needs, and imports that run one way (scripts -> helpers)."""
import ast
import dataclasses
import difflib
import inspect
import os
import re
import subprocess
import shlex

import pytest

from plumbing import bookkeeping
import d3po
import ddpo
import prdp
from conftest import ROOT

MODULES = {"ddpo": ddpo, "d3po": d3po, "prdp": prdp}
SHARED_FLAGS = ["model", "prompt_file", "reward", "output_dir", "num_epochs", "seed", "resolution", "num_steps", "eta",
                "noise_level", "max_sequence_length", "guidance_scale", "sample_batch_size", "sample_batches_per_epoch", "train_batch_size",
                "gradient_accumulation_steps", "learning_rate", "weight_decay", "max_grad_norm", "lora_rank",
                "lora_targets", "mixed_precision", "gradient_checkpointing", "tensorboard", "device", "process_timeout",
                "resume"]
# the plumbing every main() calls, in this order
SKELETON_CALLS = ["parse_args", "check_args", "load_prompts", "get_reward_fn", "load_policy", "say_long_prompts",
                  "make_optimizer", "make_scaler", "load_checkpoint", "start_output", "epoch_generator", "sample_epoch",
                  "compute_rewards", "minibatches", "share", "optimizer_step", "epoch_metrics", "end_epoch", "finish"]
SECTIONS = ["# ---- 1. ALGO LOGIC: sample", "# ---- 2. ALGO LOGIC", "# ---- 3. ALGO LOGIC",
            "# ---- 4. log, show, save ----"]
DRIFT_BUDGET = 160  # changed lines (< and >) of `diff ddpo.py <script>`


@pytest.mark.parametrize("name", MODULES)
def test_shared_flags_come_first_in_the_same_order(name):
    fields = [f.name for f in dataclasses.fields(MODULES[name].Args)]
    assert fields[:len(SHARED_FLAGS)] == SHARED_FLAGS
    src = inspect.getsource(MODULES[name].Args)
    assert src.index("# --- shared by ddpo.py, d3po.py and prdp.py ---") < src.index("model:")
    assert src.index(f"# --- {name.upper()}'s own ---") > src.index("resume:")


def help_without_source(text):
    """A help text less its final bracket, the source of the default, which may differ between the scripts."""
    return re.sub(r"\s*\([^()]*\)$", "", text)


@pytest.mark.parametrize("name", ["d3po", "prdp"])
def test_shared_flags_have_the_same_help_text_word_for_word(name):
    ours = {f.name: f.metadata for f in dataclasses.fields(MODULES[name].Args)}
    for f in dataclasses.fields(ddpo.Args)[:len(SHARED_FLAGS)]:
        assert help_without_source(ours[f.name]["help"]) == help_without_source(f.metadata["help"]), f.name
        assert ours[f.name]["choices"] == f.metadata["choices"], f.name


def test_help_without_source_removes_only_the_final_bracket():
    assert help_without_source("DDIM steps T (DDPO reference: 50)") == "DDIM steps T"
    assert help_without_source("in (0, 1] (the papers: 1.0)") == "in (0, 1]"
    assert help_without_source("a flag (no source) here") == "a flag (no source) here"


@pytest.mark.parametrize("name", MODULES)
def test_main_has_the_sections_and_plumbing_calls_in_order(name):
    src = inspect.getsource(MODULES[name].main)
    positions = [src.find(s) for s in SECTIONS]
    assert -1 not in positions and positions == sorted(positions), positions
    calls = [node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
             for node in ast.walk(ast.parse(src)) if isinstance(node, ast.Call)
             and (isinstance(node.func, ast.Name) or isinstance(node.func.value, ast.Name)
                  and node.func.value.id in ("common", "bookkeeping", "distributed"))]
    # ast.walk is breadth-first, so order the calls by their first position in the source text
    order = sorted({c for c in calls if c in SKELETON_CALLS}, key=lambda c: re.search(rf"\b{c}\(", src).start())
    assert order == SKELETON_CALLS


def allowed_lines(path):
    """The line numbers (1-based) of a script where it may differ from the others: the module docstring and imports
    (everything before the Args dataclass), the Args dataclass and PRESETS (the flags and their defaults), top-level
    definitions under a comment starting "# ALGO LOGIC", main's sections whose heading says ALGO LOGIC, and, elsewhere
    in main, a statement marked "# ALGO LOGIC" (on its header line, for an if or a loop, which then covers its body)."""
    source = open(path).read()
    lines = source.splitlines()
    allowed = set()
    for node in ast.parse(source).body:
        span = range(node.lineno - len(getattr(node, "decorator_list", [])), node.end_lineno + 1)
        comment = lines[span[0] - 2] if span[0] >= 2 else ""
        target = node.targets[0] if isinstance(node, ast.Assign) else None  # PRESETS = ..., or PRESETS[name] = ...
        if isinstance(node, ast.ClassDef) and node.name == "Args" or (
                getattr(getattr(target, "value", target), "id", None) == "PRESETS"):
            allowed.update(span)
        elif comment.startswith("# ALGO LOGIC"):
            allowed.update(span, [span[0] - 1])
        elif isinstance(node, ast.FunctionDef) and node.name == "main":
            in_algo_section = False
            for number in span:  # sections: from a "# ---- N." heading to the next one
                heading = lines[number - 1].strip()
                if heading.startswith("# ---- "):
                    in_algo_section = "ALGO LOGIC" in heading
                if in_algo_section:
                    allowed.add(number)
            for statement in ast.walk(node):
                if isinstance(statement, ast.stmt) and statement is not node:
                    body = getattr(statement, "body", None)
                    header_end = body[0].lineno - 1 if body and isinstance(body, list) else statement.end_lineno
                    if any("# ALGO LOGIC" in lines[k - 1] for k in range(statement.lineno, header_end + 1)):
                        allowed.update(range(statement.lineno, statement.end_lineno + 1))
    first_flag = min(allowed | {len(lines)}, default=len(lines))
    allowed.update(range(1, first_flag))  # the docstring and the imports
    allowed.update(k for k, line in enumerate(lines, 1) if not line.strip())  # blank lines between them
    return allowed


@pytest.mark.parametrize("name", ["d3po", "prdp"])
def test_the_scripts_diff_to_the_algorithm_within_the_budget(name):
    """`diff ddpo.py <name>.py`: at most DRIFT_BUDGET changed lines, each in a place that is the algorithm's own."""
    paths = {n: os.path.join(ROOT, f"{n}.py") for n in ("ddpo", name)}
    texts = {n: open(p).read().splitlines() for n, p in paths.items()}
    changed = {"ddpo": [], name: []}
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, texts["ddpo"], texts[name], autojunk=False).get_opcodes():
        if tag != "equal":
            changed["ddpo"] += range(i1 + 1, i2 + 1)
            changed[name] += range(j1 + 1, j2 + 1)
    total = len(changed["ddpo"]) + len(changed[name])
    assert total <= DRIFT_BUDGET, f"diff ddpo.py {name}.py: {total} changed lines, budget {DRIFT_BUDGET}"
    for n, numbers in changed.items():
        stray = [f"{n}.py:{k}: {texts[n][k - 1].strip()}" for k in numbers if k not in allowed_lines(paths[n])]
        assert not stray, "changed lines outside the docstring, flags and ALGO LOGIC sections:\n" + "\n".join(stray)


def test_the_budget_check_sees_a_stray_change(tmp_path):
    """A line changed in shared plumbing (main's preamble, or section 4) is outside every allowed place; one in
    section 3 (the algorithm's training) is inside."""
    source = open(os.path.join(ROOT, "ddpo.py")).read()
    stray = tmp_path / "stray.py"
    for call, allowed in (("bookkeeping.start_output(", False), ("bookkeeping.end_epoch(", False),
                          ("distributed.optimizer_step(", True)):
        assert call in source
        stray.write_text(source.replace(call, call[:-1] + "_changed("))
        number = next(i for i, line in enumerate(stray.read_text().splitlines(), 1) if "_changed(" in line)
        assert (number in allowed_lines(stray)) == allowed, call


def test_toy_presets_share_the_world_the_objective_and_the_budget():
    """One task for three algorithms: the same prompts, reward, sampling, samples an epoch, parameters and epochs.
    How an epoch's samples are cut into optimiser steps is each algorithm's own (tests/test_quickstart.py checks that the toy presets' mechanisms act)."""
    shared = dict(prompt_file="tutorials/shapes.txt", reward="shape_area", resolution=32, num_steps=10,
                  guidance_scale=1.0, sample_batch_size=32, sample_batches_per_epoch=2, train_batch_size=32,
                  lora_rank=0, num_epochs=30)
    for module in MODULES.values():
        preset = module.PRESETS["toy"]
        for key, value in shared.items():
            assert preset[key] == value, key
        assert set(preset) <= {f.name for f in dataclasses.fields(module.Args)}


# The toy presets before 2026-11-30, which learnt prompt alignment: README.md's alignment tables come from them
ALIGNMENT = {"d3po": dict(reward="shapes_correct", num_epochs=110),
             "prdp": dict(reward="shapes_correct", num_epochs=60, beta=16.0, clip_eps=0.1, images_per_prompt=8,
                          grad_steps_per_epoch=1)}
ALIGNMENT_SHARED = dict(prompt_file="tutorials/shapes.txt", resolution=32, num_steps=10, guidance_scale=1.0,
                        sample_batch_size=32, sample_batches_per_epoch=2, train_batch_size=16,
                        gradient_accumulation_steps=4, learning_rate=3e-3, lora_rank=8, lora_targets="cross-attention")


@pytest.mark.parametrize("script", ALIGNMENT)
def test_the_docs_give_the_alignment_settings_as_one_command_line(script):
    with open(os.path.join(ROOT, "docs", "shapes_world.md")) as f:
        lines = [line for line in f.read().replace("\\\n", " ").splitlines()
                 if line.startswith(f"python {script}.py --model toy --reward shapes_correct")]
    assert len(lines) == 1
    module = MODULES[script]
    args = bookkeeping.parse_args(module.Args, shlex.split(lines[0])[2:], presets=module.PRESETS)
    for key, value in {**ALIGNMENT_SHARED, **ALIGNMENT[script]}.items():
        assert getattr(args, key) == value, key


HELPERS = ["common", "rewards", "bookkeeping", "human_feedback", "distributed"]
PLUMBING = os.path.join(ROOT, "plumbing")


def project_imports(path):
    """The project modules a file imports, by their short names (plumbing.rewards -> rewards)."""
    tree = ast.parse(open(path).read())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module in ("plumbing", "toy_model"):  # from plumbing import rewards: plumbing.rewards
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
            else:
                names.add(node.module)
    names |= {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
              and re.fullmatch(r"[\w.]+:\w+", node.value) and node.value.split(":")[0].startswith("toy_model")}
    names = {n.split(":")[0].removeprefix("plumbing.") for n in names}
    return {n for n in names if n.split(".")[0] in {"ddpo", "d3po", "prdp", "tutorials", "toy_model", "benchmarks",
                                                    "tests", "shapes", "tiny_pipeline", "evaluate", "label", *HELPERS}}


def test_imports_run_one_way_from_the_scripts_to_the_helpers():
    assert project_imports(os.path.join(ROOT, "common.py")) == set()  # the policy, below everything
    assert project_imports(os.path.join(PLUMBING, "distributed.py")) == {"common"}  # torchrun wraps it from outside
    for helper in HELPERS[1:]:
        imported = project_imports(os.path.join(PLUMBING, f"{helper}.py"))
        assert not imported & {"ddpo", "d3po", "prdp"}, helper
    assert project_imports(os.path.join(ROOT, "toy_model", "world.py")) == {"common"}
    assert project_imports(os.path.join(PLUMBING, "rewards.py")) == {"common", "distributed", "toy_model.world"}
    assert project_imports(os.path.join(PLUMBING, "label.py")) == {"bookkeeping", "common", "human_feedback", "rewards"}
    assert project_imports(os.path.join(PLUMBING, "evaluate.py")) == {"bookkeeping", "common", "rewards"}
    assert "bookkeeping" not in project_imports(os.path.join(PLUMBING, "rewards.py"))


def test_the_toy_world_is_one_room_reached_by_import():
    """The toy model's world, detector, rewards and measurement are toy_model's modules: no file outside tests/
    imports from tests/, and none of the project's modules edits sys.path to reach another (the benchmarks, run as
    scripts, put the project itself on it)."""
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.ipynb"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert {"toy_model/world.py", "toy_model/make.py", "toy_model/measure.py", "toy_model/model_index.json"} <= set(
        subprocess.run(["git", "ls-files", "toy_model"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    for path in tracked:
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        if not path.startswith("tests/"):
            assert not re.search(r"[\"']tests[\"'/]|from tests\b|import tests\b", text), path
        if path.startswith(("toy_model/", "plumbing/", "common.py", "ddpo.py", "d3po.py", "prdp.py")):
            assert "sys.path.insert" not in text and "sys.path[:0]" not in text, path
    assert project_imports(os.path.join(ROOT, "toy_model", "measure.py")) == {"common", "bookkeeping", "evaluate",
                                                                           "rewards", "toy_model.world"}


def test_the_policy_is_single_process():
    """common.py samples and trains as if alone (distributed.py shares its work out), and the scripts' training
    loops carry no per-batch process test."""
    source = open(os.path.join(ROOT, "common.py")).read()
    assert not re.search(r"torch\.distributed|\bdist\.|WORLD_SIZE|LOCAL_RANK|\brank\(|\bworld\(", source)
    for name in MODULES:
        main = inspect.getsource(MODULES[name].main)
        assert not re.search(r"\bmine\(|\brank\(|\bworld\(|is_main\(", main), name


def test_common_is_small_and_the_shapes_world_lives_in_its_room():
    # 350 for the DDIM policy; 100 more since the flow step and Stable Diffusion 3's loading and guidance (issue 34)
    assert len(open(os.path.join(ROOT, "common.py")).read().splitlines()) <= 450
    for path in ("common.py", "plumbing/rewards.py", "plumbing/bookkeeping.py", "plumbing/human_feedback.py", "ddpo.py",
                 "d3po.py", "prdp.py",
                 os.path.join("benchmarks", "shapes.py"), os.path.join("toy_model", "make.py"),
                 os.path.join("toy_model", "measure.py")):
        source = open(os.path.join(ROOT, path)).read()
        for definition in ("COLOURS =", "SHAPES =", "SIZES =", "def detect_shapes", "def render"):
            assert definition not in source, (path, definition)


def test_every_loss_line_cites_its_source():
    """`grep -n "Eq\\.\\|Sec\\.\\|reference code"` lists every line that computes a loss."""
    for name, module in MODULES.items():
        lines = open(os.path.join(ROOT, f"{name}.py")).read().splitlines()
        loss_lines = [line for line in lines
                      if re.match(r"\s{4,}(loss|pg_loss\d|logits|target|r_hat\w*|loss_\w+) = ", line)]
        assert loss_lines, name
        for line in loss_lines:
            assert re.search(r"Eq\.|Sec\.|reference code", line), f"{name}.py: {line.strip()}"  # the README's grep


def small_args(name, tiny_dir, prompt_file, out, reward):
    argv = ["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(out), "--num-epochs", "2",
            "--resolution", "32", "--num-steps", "3", "--sample-batch-size", "4", "--sample-batches-per-epoch", "2",
            "--train-batch-size", "2", "--gradient-accumulation-steps", "2", "--device", "cpu", "--seed", "5",
            "--reward", reward]
    if name == "ddpo":
        argv += ["--inner-epochs", "2", "--timestep-fraction", "0.67"]
    if name == "prdp":
        argv += ["--images-per-prompt", "2", "--grad-steps-per-epoch", "3", "--beta", "0.1", "--clip-eps", "1e-3"]
    return argv


# UNet calls of small_args' runs, worked out by hand: 2 epochs, T = 3 steps, 8 images an epoch in 2 sampling
# batches, training batches of 2 images, 2 batches an optimiser step, and a reward under which no two images tie.
# Sampling: 2 epochs x 2 batches x 3 steps = 12 (guidance's two halves share one call). Then
# - DDPO: no reference; training 2 epochs x 2 inner epochs x 4 batches x int(3 x 0.67) = 2 steps -> 32.
# - D3PO: 4 pairs an epoch, all decided: the reference for their 8 images, 2 batches x 3 steps a epoch -> 12;
#   training one call per pair and step, 4 x 3 an epoch -> 24.
# - PRDP: 4 prompts of 2 images, one pair each: reference as D3PO's -> 12; K = 3 gradient steps of 4 images
#   (2 batches): the first at theta_old, 2 batches x 3 steps; the next two recompute without a graph first,
#   2 x 2 x (3 + 3) -> 6 + 24 = 30 an epoch -> 60.
EXPECTED_CALLS = {"ddpo": {"sample": 12, "reference": 0, "train": 32},
                  "d3po": {"sample": 12, "reference": 12, "train": 24},
                  "prdp": {"sample": 12, "reference": 12, "train": 60}}


@pytest.mark.parametrize("name", MODULES)
def test_same_outputs_and_the_fewest_unet_calls(name, tiny_dir, prompt_file, tmp_path, distinct_reward):
    from speed import count_unet_calls
    with count_unet_calls() as counts:
        MODULES[name].main(small_args(name, tiny_dir, prompt_file, tmp_path / "run", distinct_reward))
    out = tmp_path / "run"
    weights = "unet" if name == "prdp" else "lora"  # prdp.py fine-tunes the whole UNet by default, as the paper
    assert sorted(os.listdir(out)) == sorted([".lock", "checkpoint.pt", "config.json", "curves.png", weights,
                                            "metrics.jsonl", "samples"])
    assert sorted(os.listdir(out / "samples")) == ["epoch_0000.png", "epoch_0001.png"]
    rows = bookkeeping.read_metrics(out)
    for key in ("epoch", "reward_mean", "reward_std", "loss", "sample_seconds", "train_seconds", "seconds"):
        assert all(key in r for r in rows), key
    if name != "ddpo":
        assert [r["pairs"] for r in rows] == [4, 4]  # no ties, as the expected counts assume
    assert counts == EXPECTED_CALLS[name]  # and no call outside the three phases


@pytest.mark.parametrize("name", MODULES)
def test_a_nan_reward_in_a_later_epoch_stops_the_run_and_keeps_the_last_checkpoint(name, tiny_dir, prompt_file,
                                                                                   tmp_path, monkeypatch, capsys):
    import torch
    module = f"nan_later_{name}"  # a module of its own for each script: its call count starts at zero
    (tmp_path / f"{module}.py").write_text(
        "calls = []\n"
        "def reward(images, prompts):\n"
        "    calls.append(1)\n"
        "    return [float('nan') if len(calls) > 1 and i == 0 else float(im.mean()) for i, im in enumerate(images)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    argv = small_args(name, tiny_dir, prompt_file, out, f"{module}:reward")
    argv[argv.index("--num-epochs") + 1] = "3"
    with pytest.raises(SystemExit) as status:
        bookkeeping.run_main(lambda: MODULES[name].main(argv))
    assert status.value.code == 2
    assert "returned 1 non-finite values (NaN or infinite) for 8 images in epoch 1;" in capsys.readouterr().err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert [r["epoch"] for r in bookkeeping.read_metrics(out)] == [0]


def test_the_top_level_is_the_card():
    """What a reader of the algorithms opens, plus the shipped model and the folders: everything else they may skip
    is in plumbing/. animals.txt stays beside the scripts: it is their default prompt file, and the command a
    researcher types is `python d3po.py --prompt-file animals.txt`."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    top = {path.split("/")[0] for path in tracked}
    assert top == {"README.md", "requirements.txt", "ddpo.py", "d3po.py", "prdp.py", "common.py", "tests", "tutorials",
                   "toy_model", "benchmarks", "docs", "plumbing", "animals.txt", ".ci", ".gitignore"}
