"""The flow models' policy (issue 34): common.flow_step_with_logprob against the SDE's closed form written out here,
diffusers' Euler step, torch.distributions, and a one-dimensional Gaussian whose ODE marginals are known; then the
three scripts end to end on a tiny Stable Diffusion 3 pipeline, its LoRA in diffusers, and resuming."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from plumbing import bookkeeping
import common
import d3po
import ddpo
import prdp


def flow_scheduler(steps=6, shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def sde_mean_and_std(x, v, t, t_next, a, t_second):
    """The SDE dx = [v + s^2/(2t) (x + (1-t) v)] dt + s dw, s = a sqrt(t/(1-t)), in one Euler-Maruyama step from t to
    t_next, written out one sample at a time; at t = 1, (1 - t) is taken at the schedule's second t (Flow-GRPO)."""
    s = a * math.sqrt(t / (1 - (t_second if t == 1 else t)))
    dt = t_next - t
    drift = v + s**2 / (2 * t) * (x + (1 - t) * v)
    return x + drift * dt, s * math.sqrt(-dt)


def test_the_step_is_the_sdes_euler_maruyama_step_and_its_log_prob_is_the_gaussians():
    scheduler, g = flow_scheduler(), torch.Generator().manual_seed(0)
    sigmas = scheduler.sigmas.tolist()
    for i, timestep in enumerate(scheduler.timesteps):  # every step, the first (t = 1) and the last (to t = 0)
        x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
        prev, log_prob = common.flow_step_with_logprob(scheduler, v, timestep, x, 0.7, generator=g)
        for b in range(3):
            mean, std = sde_mean_and_std(x[b], v[b], sigmas[i], sigmas[i + 1], 0.7, sigmas[1])
            expected = torch.distributions.Normal(mean, std).log_prob(prev[b]).mean()
            torch.testing.assert_close(log_prob[b], expected, rtol=1e-5, atol=1e-5)
            z = (prev[b] - mean) / std  # the drawn noise: standard normal if the mean and std are the closed form's
            assert abs(float(z.mean())) < 0.25 and abs(float(z.std()) - 1) < 0.15
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0


def test_per_sample_timesteps_score_each_sample_at_its_own_step():
    scheduler, g = flow_scheduler(), torch.Generator().manual_seed(1)
    x, v, prev = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    steps = scheduler.timesteps[[0, 2, 5]]
    _, together = common.flow_step_with_logprob(scheduler, v, steps, x, 0.7, prev_sample=prev)
    for b in range(3):
        _, alone = common.flow_step_with_logprob(scheduler, v[b:b + 1], steps[b], x[b:b + 1], 0.7,
                                                 prev_sample=prev[b:b + 1])
        torch.testing.assert_close(together[b:b + 1], alone)


def test_with_the_noise_level_going_to_zero_the_step_is_diffusers_euler_step():
    scheduler, g = flow_scheduler(), torch.Generator().manual_seed(2)
    for timestep in scheduler.timesteps:
        x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        ours, _ = common.flow_step_with_logprob(scheduler, v, timestep, x, 1e-6, generator=g)
        scheduler._step_index = None  # diffusers' step keeps its own counter; find the step from the timestep
        euler = scheduler.step(v, timestep, x).prev_sample
        torch.testing.assert_close(ours, euler, rtol=0, atol=1e-5)


def test_a_noise_level_of_zero_is_refused_in_one_sentence():
    with pytest.raises(common.UserError, match="noise level must be > 0"):
        common.flow_step_with_logprob(flow_scheduler(), torch.zeros(1, 4, 8, 8), 1000.0, torch.zeros(1, 4, 8, 8), 0.0)


def gaussian_velocity(x, t, m, s):
    """The exact velocity E[eps - x_0 | x_t = x] when x_0 ~ N(m, s^2) and x_t = (1 - t) x_0 + t eps."""
    var = (1 - t) ** 2 * s**2 + t**2                  # Var x_t
    centred = x - (1 - t) * m
    return t / var * centred - (m + (1 - t) * s**2 / var * centred)  # E[eps | x] - E[x_0 | x]


def test_the_sde_keeps_the_odes_marginals_on_a_gaussian():
    """x_0 ~ N(m, s^2): along the way x_t ~ N((1 - t) m, (1 - t)^2 s^2 + t^2) whatever the noise level; the SDE's
    samples (200 steps, 40000 of them) match the marginals at t ~ 0.5 and at the end, as the ODE's do."""
    m, s, n = 1.5, 0.5, 40_000
    scheduler = flow_scheduler(200, shift=1.0)
    g = torch.Generator().manual_seed(3)
    x_sde = x_ode = torch.randn(n, 1, 1, 1, generator=g)
    checked, middle = [], int((scheduler.sigmas - 0.5).abs().argmin())
    for i, timestep in enumerate(scheduler.timesteps):
        t = float(scheduler.sigmas[i])
        if i in (0, middle):
            checked.append(t)
            for x in (x_sde, x_ode):
                assert float(x.mean()) == pytest.approx((1 - t) * m, abs=0.02)
                assert float(x.var()) == pytest.approx((1 - t) ** 2 * s**2 + t**2, rel=0.03)
        x_sde = common.flow_step_with_logprob(scheduler, gaussian_velocity(x_sde, t, m, s), timestep, x_sde, 0.7,
                                              generator=g)[0]
        x_ode = x_ode + (scheduler.sigmas[i + 1] - t) * gaussian_velocity(x_ode, t, m, s)
    assert len(checked) == 2
    for x in (x_sde, x_ode):  # t = 0: the data
        assert float(x.mean()) == pytest.approx(m, abs=0.02) and float(x.var()) == pytest.approx(s**2, rel=0.05)
    assert float((x_sde - x_ode).abs().mean()) > 0.1  # the paths differ: the SDE is stochastic, its marginals not


# ---- The three scripts on a tiny Stable Diffusion 3 pipeline -------------------------------------------------------

SCRIPTS = {"ddpo": ddpo, "d3po": d3po, "prdp": prdp}


def flow_args(name, model, prompt_file, out, epochs=2):
    args = ["--model", model, "--prompt-file", prompt_file, "--output-dir", str(out), "--num-epochs", str(epochs),
            "--resolution", "32", "--num-steps", "3", "--sample-batch-size", "4", "--sample-batches-per-epoch", "1",
            "--train-batch-size", "4", "--gradient-accumulation-steps", "1", "--learning-rate", "1e-2",
            "--lora-rank", "4", "--device", "cpu", "--seed", "5", "--reward", "jpeg_compressibility"]
    return args + (["--images-per-prompt", "2"] if name == "prdp" else [])


@pytest.fixture(scope="module")
def flow_runs(tiny_sd3_dir, prompt_file, tmp_path_factory):
    runs = {}
    for name, script in SCRIPTS.items():
        runs[name] = tmp_path_factory.mktemp(f"flow-{name}") / "run"
        script.main(flow_args(name, tiny_sd3_dir, prompt_file, runs[name]))
    return runs


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_trains_a_flow_model_and_its_lora_loads_in_diffusers_sd3_pipeline(name, flow_runs, tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline
    out = flow_runs[name]
    assert [row["epoch"] for row in bookkeeping.read_metrics(out)] == [0, 1]
    assert json.loads((out / "config.json").read_text())["noise_level"] == 0.7
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    saved = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert {key.split(".attn.")[1].rsplit(".lora", 1)[0] for key in saved} == {
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"}  # SD3's attention, both sides
    pipe.load_lora_weights(str(out / "lora"))
    assert sum("lora" in key for key in pipe.transformer.state_dict()) == len(saved)  # every adapter, none dropped
    ours, params, _ = common.load_pipeline(tiny_sd3_dir, "cpu", "no", lora_rank=4)
    bookkeeping.load_checkpoint(ours, common.make_optimizer(params, 1e-3, 0.0), common.make_scaler("cpu", "no"),
                                str(out))
    embeds, pooled = common.encode_prompts(ours, ["a cat", "a dog"], pooled=True)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([700.0, 300.0])
    with torch.no_grad():
        trained = common.denoise(ours.unet, x, t, embeds, pooled)
        torch.testing.assert_close(common.denoise(pipe.transformer, x, t, embeds, pooled), trained)
        ours.unet.disable_adapters()
        assert (common.denoise(ours.unet, x, t, embeds, pooled) - trained).abs().max() > 1e-4  # it did train


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_resumed_flow_run_is_the_uninterrupted_one(name, flow_runs, tiny_sd3_dir, prompt_file, tmp_path):
    out, script = tmp_path / "run", SCRIPTS[name]
    script.main(flow_args(name, tiny_sd3_dir, prompt_file, out, epochs=1))
    script.main(["--resume", str(out), "--num-epochs", "2"])
    straight = load_file(str(flow_runs[name] / "lora" / "pytorch_lora_weights.safetensors"))
    for key, value in load_file(str(out / "lora" / "pytorch_lora_weights.safetensors")).items():
        torch.testing.assert_close(value, straight[key], rtol=0, atol=0)
    for a, b in zip(bookkeeping.read_metrics(out), bookkeeping.read_metrics(flow_runs[name])):
        assert a["reward_mean"] == b["reward_mean"] and a["loss"] == b["loss"]


def test_sampling_and_training_score_a_step_alike_and_guidance_is_one_call(tiny_sd3_dir):
    """The log-probs stored while sampling equal those recomputed for training (same policy), and the guided
    velocity of one transformer call on both halves equals two separate calls."""
    pipe, _, autocast = common.load_pipeline(tiny_sd3_dir, "cpu", "no", lora_rank=4, reference=True)
    negative, negative_pooled = common.encode_prompts(pipe, [""], pooled=True)
    policy = common.Policy(pipe, negative, 3, 4.0, 0.7, autocast, negative_pooled)
    embeds, pooled = common.encode_prompts(pipe, ["a cat", "a dog"], pooled=True)
    samples = common.sample_trajectories(policy, embeds, torch.Generator().manual_seed(0), progress=False,
                                         pooled_embeds=pooled)
    assert samples.latents.shape == (2, 4, 4, 16, 16) and torch.isfinite(samples.log_probs).all()
    for s in range(3):
        torch.testing.assert_close(common.log_prob(policy, samples, torch.arange(2), s), samples.log_probs[:, s])
    torch.testing.assert_close(common.reference_log_probs(policy, samples, 2), samples.log_probs)  # LoRA at zero
    x, t = samples.latents[:, 1], samples.timesteps[1]
    with torch.no_grad():
        guided = common.guided_noise_pred(policy, x, t, embeds, pooled)
        uncond = common.denoise(pipe.unet, x, t, negative.expand(2, -1, -1), negative_pooled.expand(2, -1))
        cond = common.denoise(pipe.unet, x, t, embeds, pooled)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_what_a_flow_model_cannot_take_is_refused_in_one_sentence(tiny_sd3_dir, tmp_path):
    with pytest.raises(common.UserError, match="SD3 does not have"):
        common.load_pipeline(tiny_sd3_dir, "cpu", "no", lora_rank=4, lora_targets="cross-attention")
    import shutil
    dynamic = tmp_path / "dynamic"
    shutil.copytree(tiny_sd3_dir, dynamic)
    config = json.loads((dynamic / "scheduler" / "scheduler_config.json").read_text())
    (dynamic / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(config, use_dynamic_shifting=True)))
    with pytest.raises(common.UserError, match="use_dynamic_shifting.*FlowMatchEulerDiscreteScheduler, fixed shift"):
        common.load_pipeline(str(dynamic), "cpu", "no", lora_rank=4)
