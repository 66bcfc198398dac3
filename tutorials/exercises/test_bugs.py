"""The tests that catch the bugs of bugs.py: each fails on the broken function and passes once it is fixed."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import common

GATHER = """
import importlib.util, os, torch, torch.distributed as dist
spec = importlib.util.spec_from_file_location("bugs", os.environ["BUGS_FILE"])
bugs = importlib.util.module_from_spec(spec); spec.loader.exec_module(bugs)
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
p = torch.nn.Parameter(torch.zeros(3))
p.grad = torch.full((3,), float(rank + 1))          # process 0 holds 1s, process 1 holds 2s
bugs.average_gradients([p], 2)
print(p.grad.tolist(), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.points("8. Find the bug: gradients over processes", 1)
def test_every_process_holds_the_average_gradient(bugs_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BUGS_FILE": bugs_file, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", GATHER], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for (out, err), p in zip(outs, procs):
        assert p.returncode == 0, f"a process failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}"
        got = eval(out.strip().splitlines()[-1])
        assert got == [1.5] * 3, \
            f"with gradients 1 and 2 on two processes each must hold their average 1.5; got {got[0]}"


@pytest.mark.points("8. Find the bug: D3PO's ratio clamp", 1)
def test_the_clamp_band_is_on_the_ratio(bugs):
    ref = torch.zeros(2, 2)
    lp = torch.tensor([[np.log(0.902), 0.0], [np.log(1.104), 0.0]], dtype=torch.float32, requires_grad=True)
    bugs.d3po_step_loss(lp, ref, 0.1, 0.1).backward()
    assert lp.grad[0, 0] != 0, "a winner's ratio of 0.902 lies inside [0.9, 1.1] and must keep its gradient"
    assert lp.grad[1, 0] == 0, "a winner's ratio of 1.104 lies outside [0.9, 1.1] and must get no gradient"


@pytest.mark.points("8. Find the bug: saved LoRA", 1)
def test_the_saved_lora_loads_into_a_fresh_pipeline(bugs, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline
    pipe, params, _ = common.load_pipeline(tiny_model, "cpu", lora_rank=4)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)                                # as if trained
    bugs.save_lora(pipe.unet, str(tmp_path / "lora"))
    fresh = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    x, t, emb = torch.randn(1, 4, 16, 16), torch.tensor(400), common.encode_prompts(pipe, ["a cat"])
    with torch.no_grad():
        untrained = fresh.unet(x, t, encoder_hidden_states=emb).sample
        fresh.load_lora_weights(str(tmp_path / "lora"))
        loaded = fresh.unet(x, t, encoder_hidden_states=emb).sample
        trained = pipe.unet(x, t, encoder_hidden_states=emb).sample
    assert not torch.allclose(loaded, untrained), \
        "after load_lora_weights the UNet computes exactly what the untrained one does: nothing was loaded"
    assert torch.allclose(loaded, trained, atol=1e-5, rtol=1e-4), "the loaded UNet differs from the trained one"


@pytest.mark.points("8. Find the bug: advantages", 1)
def test_advantages_are_normalised_per_prompt(bugs):
    got = bugs.normalised_advantages({}, ["easy", "easy", "hard", "hard"], [0.9, 1.1, 0.1, 0.3], 16, 2)
    assert torch.allclose(got, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-4), \
        f"the better image of each prompt gets +1 and the worse -1, whatever the prompt's level; got {got.tolist()}"


@pytest.mark.points("8. Find the bug: logged reward", 1)
def test_the_logged_reward_is_the_mean(bugs):
    got = bugs.reward_metrics([1.0, 2.0, 6.0])
    assert got["reward_mean"] == pytest.approx(3.0), f"rewards 1, 2, 6 have mean 3; logged {got['reward_mean']}"
    assert got["reward_std"] == pytest.approx(np.std([1.0, 2.0, 6.0]))


@pytest.mark.points("8. Find the bug: stored samples", 1)
def test_the_stored_step_scores_again_to_the_same_log_prob(bugs):
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in scheduler.timesteps:
        stored, log_prob = bugs.sampling_step(scheduler, eps, t, x, 1.0, g)
        again = common.ddim_step_with_logprob(scheduler, eps, t, x, 1.0, prev_sample=stored)[1]
        assert torch.equal(again, log_prob), (
            f"at timestep {int(t)} the stored x_(t-1) scores {float((again - log_prob).abs().max()):.2g} away from the "
            f"log-prob stored with it: the ratio pi_theta / pi_old is not 1 before any update")
