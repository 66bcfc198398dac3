"""Find the bug: six small pieces of fine-tuning code, each with a bug that happened in public implementations
of these methods (or in the ports of their reference code). Each function's docstring says what it must do and
what users saw; each has a test in test_bugs.py that catches it. Find the bug, fix it here, and run

    python -m pytest tutorials/exercises/test_bugs.py

Each bug is in the function's body, a line or two; the docstrings and signatures are right.
"""
import os

import numpy as np
import torch


def average_gradients(params, world_size):
    """Data-parallel training: after backward, each of the world_size processes holds the gradient of its own
    share of the batch; make every process hold the AVERAGE of them, so all take the same optimiser step.

    Users saw: a learning rate tuned on one GPU diverged on eight."""
    import torch.distributed as dist
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def d3po_step_loss(log_probs, ref_log_probs, beta, ratio_clip):
    """D3PO's loss of one step of b pairs, the winner first: the ratio pi_theta / pi_ref clamped to
    [1 - ratio_clip, 1 + ratio_clip] before its log (the reference code), then -log sigmoid(beta (winner - loser)).

    Users saw: runs that trained differently from the reference code's with the same ratio_clip."""
    log_ratio = (log_probs - ref_log_probs).clamp(-ratio_clip, ratio_clip)
    logits = beta * (log_ratio[:, 0] - log_ratio[:, 1])
    return -torch.nn.functional.logsigmoid(logits).mean()


def save_lora(unet, directory):
    """Save the UNet's trained LoRA weights to `directory` so that diffusers'
    StableDiffusionPipeline.load_lora_weights(directory) puts them back into a fresh pipeline's UNet.

    Users saw: the saved file had every LoRA weight, loading it raised no error, and the loaded model drew exactly
    what the model before fine-tuning drew."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "pytorch_lora_weights.safetensors")
    save_file({k: v.contiguous() for k, v in layers.items()}, path)


def normalised_advantages(stats, prompts, rewards, buffer_size, min_count):
    """DDPO's advantages: each reward normalised against the last buffer_size rewards of ITS OWN prompt (kept in
    stats, updated here), once that prompt has min_count of them; before that against the batch.

    Users saw: the model learnt to draw the easy prompts' kind of image whatever it was asked."""
    prompts, rewards = np.asarray(prompts), np.asarray(rewards, dtype=np.float64)
    for prompt in np.unique(prompts):
        stats[str(prompt)] = (stats.get(str(prompt), []) + rewards[prompts == prompt].tolist())[-buffer_size:]
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    return torch.as_tensor(advantages, dtype=torch.float32)


def reward_metrics(rewards):
    """What an epoch logs of its rewards: their mean (reward_mean) and standard deviation (reward_std).

    Users saw: reward curves that never matched the rewards of the same samples computed afterwards."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    return {"reward_mean": float(rewards.max()), "reward_std": float(rewards.std(unbiased=False))}


def sampling_step(scheduler, model_output, timestep, sample, eta, generator):
    """One step of sampling under fp16 mixed precision: draw x_{t-1} with common.ddim_step_with_logprob, and
    return what is STORED for training (x_{t-1} kept in half precision to save memory) and its log-prob. Training
    later scores the stored x_{t-1} again under the same model, and must get exactly the same log-prob, so that
    the importance ratio pi_theta / pi_old is exactly 1 before the first update.

    Users saw (DDPO's PyTorch port): approx_kl and clipfrac above zero in the first optimiser step of an epoch,
    before the model had changed."""
    import common
    prev_sample, log_prob = common.ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta,
                                                          generator=generator)
    return prev_sample.half(), log_prob
