"""REFERENCE FIXES of tutorials/exercises/bugs.py (withhold with the rest of solutions/). Each fix is one or two
lines; the comment marked FIX says what was wrong."""
import os

import torch


def average_gradients(params, world_size):
    import torch.distributed as dist
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size  # FIX: all_reduce SUMS; the average divides by the number of processes


def d3po_step_loss(log_probs, ref_log_probs, beta, ratio_clip):
    # FIX: clamp the RATIO to [1 - eps, 1 + eps], then take its log; clamping the log-ratio to [-eps, eps] is the
    # band [e^-eps, e^eps] = [0.905, 1.105] for eps = 0.1, not [0.9, 1.1]
    log_ratio = torch.log(torch.exp(log_probs - ref_log_probs).clamp(1 - ratio_clip, 1 + ratio_clip))
    logits = beta * (log_ratio[:, 0] - log_ratio[:, 1])
    return -torch.nn.functional.logsigmoid(logits).mean()


def save_lora(unet, directory):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    os.makedirs(directory, exist_ok=True)
    # FIX: load_lora_weights takes the UNet's weights from keys starting with "unet." and silently ignores others;
    # diffusers' own writer adds the prefix (as bookkeeping.save_weights does)
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)


def normalised_advantages(stats, prompts, rewards, buffer_size, min_count):
    # FIX: normalise each prompt's rewards by that prompt's buffer (mean and std of its last buffer_size rewards)
    # once it holds min_count, the batch's only before: exactly ddpo.py's per_prompt_advantages
    from ddpo import per_prompt_advantages
    return per_prompt_advantages(stats, prompts, rewards, buffer_size, min_count)


def reward_metrics(rewards):
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False))}  # FIX: mean


def sampling_step(scheduler, model_output, timestep, sample, eta, generator):
    import common
    prev_sample, _ = common.ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta,
                                                   generator=generator)
    stored = prev_sample.half()  # FIX: score what you store: the log-prob of the half-precision x_{t-1}
    _, log_prob = common.ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta, prev_sample=stored)
    return stored, log_prob
