"""Rewards by name, user rewards as module:function, prompt files, image grids and curves."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from plumbing import bookkeeping
from plumbing import rewards
from common import UserError
from conftest import ROOT


def test_jpeg_rewards_measure_the_file_size():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    sizes = rewards.jpeg_kb(images)
    # the same number PIL gives for the same uint8 image at quality 95, in kB
    buf = io.BytesIO()
    Image.fromarray(rewards.to_uint8(noisy)[0]).save(buf, format="JPEG", quality=95)
    assert sizes[1] == pytest.approx(len(buf.getvalue()) / 1000)
    assert sizes[0] < sizes[1]
    np.testing.assert_array_equal(rewards.get_reward_fn("jpeg_compressibility")(images, ["", ""]), -sizes)
    np.testing.assert_array_equal(rewards.get_reward_fn("jpeg_incompressibility")(images, ["", ""]), sizes)


def test_user_reward_as_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(
        "def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = rewards.get_reward_fn("my_reward:brightness")
    got = rewards.compute_rewards(fn, torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]), ["a", "b"])
    assert got.dtype == torch.float32 and got.tolist() == [0.0, 1.0]
    with pytest.raises(rewards.UserError, match="could not import"):
        rewards.get_reward_fn("my_reward:nothing_here")
    with pytest.raises(rewards.UserError, match="one number each"):
        rewards.compute_rewards(lambda images, prompts: [1.0], torch.zeros(2, 3, 4, 4), ["a", "b"])


def test_the_shapes_worlds_rewards_are_reached_by_name():
    from toy_model import world as shapes_world
    for name in ("shapes_alignment", "shapes_correct", "shape_area"):
        assert rewards.get_reward_fn(name) is getattr(shapes_world, name)
    assert rewards.get_reward_fn("toy_model.world:shape_area") is shapes_world.shape_area


def test_unknown_reward_lists_the_known_ones():
    with pytest.raises(rewards.UserError, match="jpeg_compressibility, jpeg_incompressibility"):
        rewards.get_reward_fn("aesthetic_maybe")


def test_prompt_file_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\n  a cat  \n#a dog\na horse\n\n")
    assert bookkeeping.load_prompts(str(path)) == ["a cat", "a horse"]


def test_animals_file_is_the_papers_list():
    animals = bookkeeping.load_prompts(os.path.join(ROOT, "animals.txt"))
    assert len(animals) == len(set(animals)) == 45
    assert animals[:3] == ["cat", "dog", "horse"] and animals[-1] == "kangaroo"


def test_grid_has_one_cell_per_image(tmp_path):
    images = torch.rand(5, 3, 16, 16)
    bookkeeping.save_grid(images, ["a"] * 5, str(tmp_path / "g.png"), columns=4)
    grid = Image.open(tmp_path / "g.png")
    assert grid.size == (4 * 96, 2 * (16 + 24))  # two lines of caption under each image


def test_curves_plot_each_metric_in_its_own_panel_with_the_reward_band(tmp_path):
    rows = [{"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.05, "loss": 1.0 - 0.1 * e, "seconds": 3.0 + e % 2,
             "pairs": 4 + e, "clipfrac": 0.0, "sample_seconds": 1.0, "train_seconds": 2.0} for e in range(10)]
    rows[3]["loss"] = float("nan")  # an epoch that trained nothing: left out of its curve, not drawn as a gap
    figure = bookkeeping.plot_curves(rows)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    # reward_mean first; reward_std (the band), the two phase times and a flat metric (clipfrac 0 throughout) get none
    assert [ax.get_title().split(":")[0] for ax in panels] == ["reward_mean", "loss", "seconds", "pairs"]
    assert panels[0].get_title() == "reward_mean: 0 -> 0.9" and panels[1].get_title() == "loss: 1 -> 0.1"
    reward_line, loss_line = panels[0].lines[0], panels[1].lines[0]
    np.testing.assert_allclose(reward_line.get_ydata(), [0.1 * e for e in range(10)])
    assert list(loss_line.get_xdata()) == [e for e in range(10) if e != 3]
    band = panels[0].collections[0].get_paths()[0].vertices[:, 1]  # the +- std band around the reward
    assert band.min() == pytest.approx(-0.05) and band.max() == pytest.approx(0.95)
    assert not panels[1].collections  # no band around anything else
    bookkeeping.save_curves(rows, str(tmp_path / "c.png"))
    assert Image.open(tmp_path / "c.png").size[0] > 400


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None])
def test_a_non_finite_reward_is_refused_with_its_count(value):
    images = torch.zeros(3, 3, 4, 4)

    def flaky(images, prompts):
        return [0.5, value, 0.25]

    with pytest.raises(rewards.UserError, match="the reward flaky returned 1 non-finite values .* for 3 images"):
        rewards.compute_rewards(flaky, images, ["a", "b", "c"])
    with pytest.raises(rewards.UserError, match="not numbers"):
        rewards.compute_rewards(lambda images, prompts: ["good", "bad", "ugly"], images, ["a", "b", "c"])


def test_a_failed_write_leaves_neither_a_half_file_nor_the_old_one_changed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("the previous epoch")

    def full_disk(p):
        with open(p, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="is the disk full"):  # one sentence (the OSError is its cause)
        bookkeeping.atomic_write(str(path), full_disk)
    assert path.read_text() == "the previous epoch" and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
