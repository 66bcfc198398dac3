"""Several processes, one run: `torchrun --nproc-per-node N ddpo.py ...` (and d3po.py, prdp.py).

The flags keep their meaning whatever N is: an epoch is --sample-batch-size x --sample-batches-per-epoch images in
all, an optimiser step --train-batch-size x --gradient-accumulation-steps. The N processes share that work and do
what one process would, to float rounding. common.py's policy samples and trains as if alone; the scripts call it
through the wrappers here, which share the work from outside:
- `sample_epoch`: every process draws the epoch's prompts and noise from the same epoch generator, and samples its
  share of the sampling batches (batch b is process b mod N's); the others' noise it draws and drops, so that every
  process's random stream stays the one-process run's; the trajectories are summed over the processes (each holds
  zeros in the rows it did not sample), so every process holds the whole epoch, and everything computed from it
  (the rewards, gathered by rewards.py; DDPO's per-prompt statistics, D3PO's preferences, PRDP's pairs) is the same
  in all;
- `reference_log_probs`: the same, batch b of the rows process b mod N's;
- `share`: each optimiser step's training batches shared the same way (whole batches: a D3PO pair and a PRDP prompt
  stay in one process); `optimizer_step`: the gradients summed over the processes once per step, before clipping,
  and the weights checked alike after it;
- only process 0 writes (config, metrics, image grids, weights, checkpoints), and any number of processes can
  resume a run.
gloo on the CPU, NCCL on CUDA (each process on its LOCAL_RANK's GPU). One process: every wrapper is the common.py
function it wraps.
"""
import ctypes
import datetime
import itertools
import os
import sys

import torch
import torch.distributed as dist

import common


def setup(device, save_memory=False, timeout=600.0):
    """Join torchrun's process group when there is one (WORLD_SIZE > 1); returns this process's device. TF32
    matmuls are allowed on CUDA (the speed of half precision's tensor cores for float32 matmuls). On the CPU, glibc
    is told what to do with freed tensors, for the rest of the process: keep them for the next ones (speed, the
    default) or, with save_memory (--gradient-checkpointing), give them back to the system at once."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 matmuls on CUDA
    if str(device).split(":")[0] == "cpu":  # (a device that is not one is reported later, in one sentence)
        return_freed_memory() if save_memory else keep_freed_memory()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    # timeout: how long a collective waits for a process that does not come (a stuck process ends the run then,
    # with an error in the processes that waited; the last finished epoch's checkpoint is whole)
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout))
    return device


def return_freed_memory():
    """Once glibc's malloc has seen a large block freed, it keeps freed blocks of up to 32 MiB for reuse instead of
    giving them back (its dynamic mmap threshold); a UNet's passes free thousands of such tensors, and at 512 px on
    the CPU that kept 2 to 5 GiB more resident than the live tensors. A fixed threshold, glibc's own default of
    128 KiB, returns every larger freed tensor at once; the price is time, as the system hands out fresh zeroed
    pages for each new tensor (docs/scale.md has both). Linux only; CUDA memory is not affected."""
    _mallopt((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 128 * 1024), (M_TRIM_THRESHOLD, 128 * 1024))  # glibc's defaults


def keep_freed_memory():
    """The other way round, for speed: glibc's default still gives a tensor over 32 MiB its own pages from the
    system, and the heap's free top back once it passes twice the largest tensor freed so far, so each UNet pass
    at 512 px takes hundreds of thousands of fresh zeroed pages from the system (a tenth of a forward's time and
    more of a backward's, docs/scale.md). Here every tensor comes from the heap and the heap is never trimmed:
    a freed tensor's memory serves the next one. The process keeps the most it ever held: about its peak anyway
    (4% above glibc's default's at 512 px, docs/scale.md). Linux only; CUDA memory is not affected."""
    _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # no block of its own from the system; -1: never trim


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # as in glibc's malloc.h


def _mallopt(*settings):
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # a C library without mallopt (musl): nothing to do
            return
        for option, value in settings:
            mallopt(option, value)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """Whether this process writes: process 0, or the only one."""
    return rank() == 0


def mine(batch):
    """Whether the batch numbered `batch` (sampling or training) is this process's."""
    return batch % world() == rank()


def share(batches):
    """This process's share of an optimiser step's training batches: batch b is process b mod N's."""
    return [batch for b, batch in enumerate(batches) if mine(b)]


def sample_epoch(policy, args, prompts, generator, *more, **kwargs):
    """common.sample_epoch, each process sampling its share of the batches; every process returns the whole epoch."""
    if world() == 1:
        return common.sample_epoch(policy, args, prompts, generator, *more, **kwargs)
    batches = itertools.count()  # the batch sample_mine is called for

    def sample_mine(policy, embeds, generator, latents=None, progress=True, pooled=None):
        if mine(next(batches)):
            return common.sample_trajectories(policy, embeds, generator, latents, progress and is_main(), pooled)
        # another process's batch: its noise (x_T unless given, and one a step) drawn here and dropped, so that this
        # process's random stream goes on as the one-process run's does; zeros in its rows until summed
        shape = (len(embeds), *common.latent_size(policy.pipe))
        for _ in range(policy.num_steps + (latents is None)):
            torch.randn(shape, generator=generator, device=generator.device)
        policy.pipe.scheduler.set_timesteps(policy.num_steps, device=embeds.device)
        resolution = policy.pipe.resolution
        return common.Trajectories(
            torch.zeros((len(embeds), 3, resolution, resolution), device=embeds.device),
            torch.zeros((shape[0], policy.num_steps + 1, *shape[1:]), device=embeds.device),
            torch.zeros((len(embeds), policy.num_steps), device=embeds.device),
            policy.pipe.scheduler.timesteps, embeds, pooled)

    batch_prompts, samples = common.sample_epoch(policy, args, prompts, generator, *more, sample=sample_mine,
                                                **kwargs)
    for tensor in (samples.images, samples.latents, samples.log_probs):
        dist.all_reduce(tensor)  # each row is one process's, zeros in the others': the sum is every process's
    return batch_prompts, samples


def reference_log_probs(policy, samples, batch_size, rows=None):
    """common.reference_log_probs, each process computing its share of the batches of rows; every process returns
    them all (NaN in the rows not asked for, as there)."""
    if world() == 1:
        return common.reference_log_probs(policy, samples, batch_size, rows)
    rows = torch.arange(len(samples.log_probs)) if rows is None else torch.as_tensor(rows).flatten().cpu()
    mine_rows = share(rows.split(batch_size))
    mine_rows = torch.cat(mine_rows) if mine_rows else rows[:0]  # fewer batches than processes: maybe none
    out = common.reference_log_probs(policy, samples, batch_size, mine_rows)
    others = torch.ones(len(out), dtype=torch.bool)
    others[mine_rows] = False
    out[others.to(out.device)] = 0.0
    dist.all_reduce(out)  # each process's rows, zeros in the others'
    missing = torch.ones(len(out), dtype=torch.bool)
    missing[rows] = False
    return out.masked_fill_(missing.to(out.device)[:, None], float("nan"))


def optimizer_step(optimizer, scaler, params, max_grad_norm):
    """common.optimizer_step on the gradients summed over the processes, and a check after it that the processes'
    weights are still alike. Returns the pre-clip norm of the summed gradient."""
    sum_gradients(params)
    norm = common.optimizer_step(optimizer, scaler, params, max_grad_norm)
    check_in_step(params)
    return norm


def gather_objects(value):
    """A list of every process's value (picklable), in process order."""
    if world() == 1:
        return [value]
    values = [None] * world()
    dist.all_gather_object(values, value)
    return values


def sum_gradients(params):
    """Each process's gradients are its share of the step's (the loss divided by the step's batches in all):
    summed, they are the one-process gradient. A process with no batch in the step adds zeros."""
    if world() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for work in [dist.all_reduce(p.grad, async_op=True) for p in params]:
        work.wait()


def check_in_step(params):
    """Stop if the processes' weights have drifted apart (gradients not summed alike): a cheap checksum a step."""
    if world() == 1:
        return
    total = torch.stack([p.detach().double().sum() for p in params]).sum().cpu()
    sums = gather_objects(float(total))
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"the processes' weights differ after an optimiser step (checksums {sums})")


def finish():
    """Leave the process group at the end of a run, once every process is there."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
