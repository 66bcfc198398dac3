"""Rewards by name, user rewards as module:function, and prompt files."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT


def test_jpeg_rewards_measure_the_file_size():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    sizes = common.jpeg_kb(images)
    # the same number PIL gives for the same uint8 image at quality 95, in kB
    buf = io.BytesIO()
    Image.fromarray(common.to_uint8(noisy)[0]).save(buf, format="JPEG", quality=95)
    assert sizes[1] == pytest.approx(len(buf.getvalue()) / 1000)
    assert sizes[0] < sizes[1]
    np.testing.assert_array_equal(common.get_reward_fn("jpeg_compressibility")(images, ["", ""]), -sizes)
    np.testing.assert_array_equal(common.get_reward_fn("jpeg_incompressibility")(images, ["", ""]), sizes)


def test_user_reward_as_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(
        "def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = common.get_reward_fn("my_reward:brightness")
    rewards = common.compute_rewards(fn, torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]), ["a", "b"])
    assert rewards.dtype == np.float32 and rewards.tolist() == [0.0, 1.0]
    with pytest.raises(common.UserError, match="could not import"):
        common.get_reward_fn("my_reward:nothing_here")
    with pytest.raises(common.UserError, match="one number each"):
        common.compute_rewards(lambda images, prompts: [1.0], torch.zeros(2, 3, 4, 4), ["a", "b"])


def test_unknown_reward_lists_the_known_ones():
    with pytest.raises(common.UserError, match="jpeg_compressibility, jpeg_incompressibility"):
        common.get_reward_fn("aesthetic_maybe")


def test_prompt_file_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\n  a cat  \n#a dog\na horse\n\n")
    assert common.load_prompts(str(path)) == ["a cat", "a horse"]


def test_animals_file_is_the_papers_list():
    animals = common.load_prompts(os.path.join(ROOT, "animals.txt"))
    assert len(animals) == len(set(animals)) == 45
    assert animals[:3] == ["cat", "dog", "horse"] and animals[-1] == "kangaroo"


def test_grid_has_one_cell_per_image(tmp_path):
    images = torch.rand(5, 3, 16, 16)
    common.save_grid(images, ["a"] * 5, str(tmp_path / "g.png"), columns=4)
    grid = Image.open(tmp_path / "g.png")
    assert grid.size == (4 * 96, 2 * (16 + 12))


def test_curves_draw_each_metric_in_its_own_panel_going_the_right_way(tmp_path):
    rows = [{"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.05, "loss": 1.0 - 0.1 * e, "seconds": 3.0,
             "sample_seconds": 1.0, "train_seconds": 2.0} for e in range(10)]
    common.save_curves(rows, str(tmp_path / "c.png"), width=200, height=100, columns=3)
    image = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    # panels: reward_mean, loss, seconds (std and the two phase times are not drawn): one row of three
    assert image.shape == (100, 600, 3)
    line = (np.abs(image - np.array([30, 80, 200])).sum(-1) < 30)  # the curves' colour

    def height_at(panel, fraction):
        """Mean row of the curve's pixels near a fraction of the panel's plot width."""
        x = panel * 200 + 34 + int(fraction * (200 - 42))
        rows_hit = np.nonzero(line[:, x - 2:x + 3].any(1))[0]
        assert len(rows_hit), (panel, fraction)
        return rows_hit.mean()

    assert height_at(0, 0.05) > height_at(0, 0.95) + 40  # reward rises: the line ends higher (smaller row)
    assert height_at(1, 0.05) + 40 < height_at(1, 0.95)  # loss falls
    assert abs(height_at(2, 0.05) - height_at(2, 0.95)) < 3  # constant seconds: flat
    band = (np.abs(image - np.array([205, 220, 245])).sum(-1) < 10)
    assert band[:, :200].sum() > 200 and band[:, 200:].sum() == 0  # the +- std band only around the reward
