"""No training call waits for the host (issue 36): on a GPU, every copy between host and GPU memory and every read of a
GPU value (`.cpu()`, `.item()`, CPU indices into GPU tensors) makes Python wait until the GPU has finished all it was
given. The training loops may do that once a batch or an optimiser step, never once per UNet call.

No GPU here: the samples and the model live on PyTorch's "meta" device instead (shapes, no values), a second device
on which each such crossing shows as an operation with a CPU and a meta tensor, or as a copy between them. Sampling
and rewards are faked (they need values); the training phase runs as written. Its crossings must not grow with the
number of denoising steps, which multiplies the training calls."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import common
import d3po
import ddpo
import prdp
from plumbing import bookkeeping, distributed
import gpu_check  # benchmarks/ is on the path (conftest.py): its project_line names the line that asked


INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
            torch.ops.aten._index_put_impl_.default)


class Crossings(TorchDispatchMode):
    """Counts, by the project's line that asked, every operation that mixes CPU and meta tensors (a 0-dim CPU tensor
    is a number to CUDA too), every copy between them, and every read of a meta value, while counting() is true.
    Reads and copies out of meta return ones, so that the run goes on."""

    def __init__(self, counting):
        super().__init__()
        self.counting, self.where = counting, collections.Counter()

    def note(self, kind, always=False):
        if self.counting() or always:
            self.where[f"{kind} at {(gpu_check.project_line(skip='tests') or '?').split(' ')[0]}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_meta = bool(tensors) and tensors[0].device.type == "meta"
        if func is torch.ops.aten._local_scalar_dense.default and on_meta:
            self.note("read")
            return True if tensors[0].dtype == torch.bool else 1.0
        to = kwargs.get("device")
        if func is torch.ops.aten._to_copy.default and to is not None and to.type != tensors[0].device.type:
            self.note("copy")
            if on_meta:
                return torch.ones(tensors[0].shape, dtype=kwargs.get("dtype") or tensors[0].dtype)
        elif len({t.device.type for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}) > 1:
            if func in INDEXING and tensors[0].device.type == "meta":
                self.note("CPU indices")  # CUDA copies them over, and waits
            else:
                self.note(f"{func} on two devices, which CUDA refuses,", always=True)
        return func(*args, **kwargs)


def training_crossings(module, model_dir, prompt_file, out, steps, monkeypatch):
    """One epoch of module on the meta device, sampling and rewards faked; the crossings while the UNet trains."""
    policies, load = [], common.load_policy

    def load_policy(*args, **kwargs):
        policies.append(load(*args, **kwargs)[0])
        return policies[-1], [p for p in policies[-1].pipe.unet.parameters() if p.requires_grad]

    def sample_epoch(policy, args, prompts, generator, images_per_prompt=1, shared_noise=False, **kwargs):
        n, pipe = args.sample_batch_size * args.sample_batches_per_epoch, policy.pipe
        pipe.scheduler.set_timesteps(policy.num_steps, device="meta")
        meta = lambda *shape: torch.zeros(shape, device="meta")  # noqa: E731
        pooled = None if policy.negative_pooled is None else meta(n, *policy.negative_pooled.shape[1:])
        return [prompts[i // images_per_prompt % len(prompts)] for i in range(n)], common.Trajectories(
            meta(n, 3, pipe.resolution, pipe.resolution), meta(n, policy.num_steps + 1, *common.latent_size(pipe)),
            meta(n, policy.num_steps), pipe.scheduler.timesteps, meta(n, *policy.negative_embeds.shape[1:]), pooled)

    monkeypatch.setattr(common, "load_policy", load_policy)
    monkeypatch.setattr(distributed, "sample_epoch", sample_epoch)
    monkeypatch.setattr(module, "compute_rewards", lambda fn, images, prompts, epoch=None: torch.arange(
        len(prompts), dtype=torch.float32).flip(0))  # all different: every pair has a winner
    monkeypatch.setattr(bookkeeping, "epoch_metrics", lambda *args, **kwargs: {})
    monkeypatch.setattr(bookkeeping, "end_epoch", lambda *args, **kwargs: None)
    crossings = Crossings(lambda: bool(policies) and policies[-1].pipe.unet.training)
    with crossings:
        module.main(["--model", model_dir, "--prompt-file", prompt_file, "--output-dir", str(out), "--num-epochs", "1",
                     "--resolution", "32", "--num-steps", str(steps), "--device", "meta", "--lora-rank", "4",
                     "--sample-batch-size", "4", "--sample-batches-per-epoch", "1", "--train-batch-size", "2",
                     "--gradient-accumulation-steps", "1",
                     *(["--images-per-prompt", "2", "--grad-steps-per-epoch", "1"] if module is prdp else [])])
    return crossings.where


@pytest.mark.parametrize("model", ["tiny_dir", "tiny_sd3_dir"], ids=["ddim", "flow"])
@pytest.mark.parametrize("module", [ddpo, d3po, prdp], ids=lambda m: m.__name__)
def test_the_training_loop_never_waits_for_the_gpu_once_a_unet_call(module, model, prompt_file, tmp_path, monkeypatch,
                                                                     request):
    model_dir = request.getfixturevalue(model)
    one, two = (training_crossings(module, model_dir, prompt_file, tmp_path / str(steps), steps, monkeypatch)
                for steps in (1, 2))  # twice the training calls
    assert one == two, f"with 1 denoising step: {dict(one)}\nwith 2: {dict(two)}"
    assert not [where for where in one if "refuses" in where], dict(one)
    assert sum(one.values()) > 0  # the counter sees the loop's own moves: each batch's indices go to the device once
