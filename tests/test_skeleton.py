"""The three scripts share one skeleton, so that `diff ddpo.py d3po.py` shows the algorithm and little else:
the same shared flags in the same order, the same sections and plumbing calls in the same order, the same
outputs, and no more UNet calls than each algorithm needs."""
import ast
import dataclasses
import inspect
import os

import pytest

import common
import d3po
import ddpo
import prdp

MODULES = {"ddpo": ddpo, "d3po": d3po, "prdp": prdp}
SHARED_FLAGS = ["model", "prompt_file", "reward", "output_dir", "num_epochs", "seed", "resolution", "num_steps", "eta",
                "guidance_scale", "sample_batch_size", "sample_batches_per_epoch", "train_batch_size",
                "gradient_accumulation_steps", "learning_rate", "weight_decay", "max_grad_norm", "lora_rank",
                "lora_targets", "mixed_precision", "device", "resume"]
# the plumbing every main() calls, in this order
SKELETON_CALLS = ["parse_args", "load_prompts", "load_pipeline", "make_optimizer", "make_scaler",
                  "load_checkpoint", "start_output", "epoch_generator", "sample_epoch", "compute_rewards",
                  "optimizer_step", "end_epoch", "finish"]
SECTIONS = ["# ---- 1. sample", "# ---- 2. ALGO LOGIC", "# ---- 3. ALGO LOGIC", "# ---- 4. log, show, save ----"]


@pytest.mark.parametrize("name", MODULES)
def test_shared_flags_come_first_in_the_same_order(name):
    fields = [f.name for f in dataclasses.fields(MODULES[name].Args)]
    assert fields[:len(SHARED_FLAGS)] == SHARED_FLAGS
    src = inspect.getsource(MODULES[name].Args)
    assert src.index("# --- shared by ddpo.py, d3po.py and prdp.py ---") < src.index("model:")
    assert src.index(f"# --- {name.upper()}'s own ---") > src.index("resume:")


@pytest.mark.parametrize("name", MODULES)
def test_main_has_the_sections_and_plumbing_calls_in_order(name):
    src = inspect.getsource(MODULES[name].main)
    positions = [src.find(s) for s in SECTIONS]
    assert -1 not in positions and positions == sorted(positions), positions
    calls = [node.func.attr for node in ast.walk(ast.parse(src)) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
             and node.func.value.id == "common"]
    # ast.walk is breadth-first, so order the calls by their first position in the source text
    order = sorted({c for c in calls if c in SKELETON_CALLS}, key=lambda c: src.index(f"common.{c}("))
    assert order == SKELETON_CALLS


@pytest.mark.parametrize("name", MODULES)
def test_toy_presets_share_the_world_and_its_budget(name):
    preset = MODULES[name].PRESETS["toy"]
    for key, value in dict(prompt_file="tutorials/shapes.txt", resolution=32, num_steps=10).items():
        assert preset[key] == value, key
    assert set(preset) <= {f.name for f in dataclasses.fields(MODULES[name].Args)}


def small_args(name, tiny_dir, prompt_file, out, epochs):
    argv = ["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(out), "--num-epochs", str(epochs),
            "--resolution", "32", "--num-steps", "3", "--sample-batch-size", "4", "--sample-batches-per-epoch", "2",
            "--train-batch-size", "2", "--gradient-accumulation-steps", "2", "--device", "cpu", "--seed", "5"]
    if name == "ddpo":
        argv += ["--inner-epochs", "2", "--timestep-fraction", "0.67"]
    if name == "prdp":
        argv += ["--images-per-prompt", "2", "--grad-steps-per-epoch", "3", "--beta", "0.1", "--clip-eps", "1e-3"]
    return argv


@pytest.mark.parametrize("name", MODULES)
def test_same_outputs_and_the_fewest_unet_calls(name, tiny_dir, prompt_file, tmp_path):
    from speed import count_unet_calls, minimum_calls
    argv = small_args(name, tiny_dir, prompt_file, tmp_path / "run", 2)
    with count_unet_calls() as counts:
        MODULES[name].main(argv)
    out = tmp_path / "run"
    weights = "unet" if name == "prdp" else "lora"  # prdp.py fine-tunes the whole UNet by default, as the paper
    assert sorted(os.listdir(out)) == sorted(["checkpoint.pt", "config.json", "curves.png", weights, "metrics.jsonl",
                                            "samples"])
    assert sorted(os.listdir(out / "samples")) == ["epoch_0000.png", "epoch_0001.png"]
    rows = common.read_metrics(out)
    for key in ("epoch", "reward_mean", "reward_std", "loss", "sample_seconds", "train_seconds", "seconds"):
        assert all(key in r for r in rows), key
    minimum = minimum_calls(name, common.parse_args(MODULES[name].Args, argv), rows)
    assert minimum["sample"] == 2 * 2 * 3  # epochs x batches x steps
    assert minimum["reference"] == (0 if name == "ddpo" else minimum["sample"])  # once per epoch, not per step
    assert counts == minimum  # and no call outside the three phases
