"""Shared fixtures: everything offline, tiny pipelines built from configs and saved with save_pretrained."""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a model hub
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N workers of one thread each (and their subprocesses)
    os.environ["OMP_NUM_THREADS"] = "1"  # not two each, fighting over two cores
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__)), os.path.join(ROOT, "benchmarks")]  # + speed, shapes

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_pipeline import make_tiny_pipeline  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes of training, or several processes; leave out with -m 'not slow'")
    config.addinivalue_line("markers", "long: the DDIM toy's quick starts, minutes each; run only with --long")


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="also run the tests marked long (the DDIM toy's quick "
                     "starts, four minutes more on two cores); CI leaves them out")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--long"):
        skip = pytest.mark.skip(reason="the DDIM toy's quick starts run with --long (tests/test_quickstart.py)")
        for item in items:
            if "long" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random SD pipeline directory (epsilon prediction)."""
    return make_tiny_pipeline(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# a comment\na cat\n\na dog\na photo of a horse\n")
    return str(path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def horse_only_reward(tmp_path, monkeypatch):
    """The name of a user reward under which the images of every prompt but the horse all score 0 (they tie)."""
    (tmp_path / "tie_reward.py").write_text(
        "def horse_brightness(images, prompts):\n"
        "    return [float(im.mean()) if 'horse' in p else 0.0 for im, p in zip(images, prompts)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tie_reward:horse_brightness"


@pytest.fixture
def distinct_reward(tmp_path, monkeypatch):
    """The name of a user reward under which no two images tie: their mean brightness."""
    (tmp_path / "distinct_reward.py").write_text(
        "def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "distinct_reward:brightness"


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny random Stable Diffusion 3 pipeline directory (a flow model: transformer, FlowMatchEuler scheduler)."""
    from tiny_pipeline import make_tiny_sd3_pipeline
    return make_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("tiny-sd3")))
