"""Scale (issue 21): gradient checkpointing gives the same gradients for less memory; the frozen reference UNet of
full fine-tuning is kept in the half dtype; metrics go to TensorBoard on request."""
import importlib.util
import os
import platform
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch

from plumbing import bookkeeping
import common
import d3po
import ddpo
import prdp

T = 3


@pytest.fixture(scope="module")
def lora_policy(tiny_dir):
    """A LoRA policy moved away from its no-op start (so that every adapter has a gradient), 2 prompts x 2 images
    sampled from it with their reference log-probs, and advantages."""
    pipe, params, autocast = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=4, reference=True)
    policy = common.Policy(pipe, common.encode_prompts(pipe, [""]), T, 5.0, 1.0, autocast)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    args = SimpleNamespace(sample_batch_size=4, sample_batches_per_epoch=1)
    _, samples = common.sample_epoch(policy, args, ["a cat", "a dog"], g, images_per_prompt=2, progress=False)
    return policy, params, samples, common.reference_log_probs(policy, samples, 4), torch.randn(4, generator=g)


def each_scripts_loss_backward(name, policy, samples, ref_log_probs, rewards):
    """Backpropagate the loss the script trains with, over every step of the 4 samples, as its training loop does."""
    idx = torch.arange(4)
    if name == "prdp":
        args = SimpleNamespace(num_steps=T, images_per_prompt=2, beta=0.02, clip_eps=1e-4, train_batch_size=4)
        prdp.rdp_backward(policy, samples, idx, ref_log_probs, rewards, args, lambda loss: loss)
        return
    for s in range(T):
        log_probs = common.log_prob(policy, samples, idx, s)
        if name == "ddpo":
            loss, _ = ddpo.ddpo_loss(log_probs, samples.log_probs[:, s] - 0.01, rewards, 1e-4, 5.0)
        else:
            loss, _ = d3po.d3po_loss(log_probs.view(-1, 2), ref_log_probs[:, s].view(-1, 2), 0.1, 0.1)
        loss.backward()


def test_the_malloc_setting_is_made_for_cpu_runs_only(monkeypatch):
    """glibc's settings are process-wide: a CUDA run's host memory is left as it is; a CPU run keeps freed memory
    for speed, or gives it back with --gradient-checkpointing."""
    from plumbing import distributed
    calls = []
    monkeypatch.setattr(distributed, "return_freed_memory", lambda: calls.append("return"))
    monkeypatch.setattr(distributed, "keep_freed_memory", lambda: calls.append("keep"))
    for save_memory in (True, False):
        distributed.setup("cuda", save_memory=save_memory)
        distributed.setup("cuda:1", save_memory=save_memory)
    assert calls == []
    distributed.setup("cpu", save_memory=True)
    distributed.setup("cpu", save_memory=False)
    assert calls == ["return", "keep"]


@pytest.mark.parametrize("name", ["ddpo", "d3po", "prdp"])
def test_gradient_checkpointing_gives_each_scripts_loss_the_same_gradients(lora_policy, name):
    policy, params, samples, ref_log_probs, rewards = lora_policy
    unet, grads = policy.pipe.unet, {}
    unet.train()
    for checkpointing in (False, True):
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
        each_scripts_loss_backward(name, policy, samples, ref_log_probs, rewards)
        grads[checkpointing] = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    unet.disable_gradient_checkpointing()
    assert max(float(g.abs().max()) for g in grads[False]) > 1e-5                 # a gradient worth comparing
    for plain, checkpointed in zip(grads[False], grads[True]):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-8)


def saved_bytes(policy, samples):
    """Bytes autograd keeps for the backward pass of one training step's log-prob."""
    total = []

    def pack(tensor):
        total.append(tensor.numel() * tensor.element_size())
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        common.log_prob(policy, samples, torch.arange(4), 0)
    return sum(total)


def test_the_flag_turns_checkpointing_on_and_it_keeps_fewer_activations(tiny_dir, lora_policy):
    policy, _, samples, _, _ = lora_policy
    policy.pipe.unet.train()
    plain = saved_bytes(policy, samples)
    pipe, _, _ = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=4, gradient_checkpointing=True)
    checkpointed = common.Policy(pipe, policy.negative_embeds, T, 5.0, 1.0)
    pipe.unet.train()
    pipe.scheduler.set_timesteps(T)
    assert saved_bytes(checkpointed, samples) < 0.5 * plain


def test_the_reference_unet_of_full_fine_tuning_is_kept_in_the_half_dtype(tiny_dir):
    pipe, params, _ = common.load_pipeline(tiny_dir, "cpu", "bf16", lora_rank=0, reference=True)
    reference = pipe.reference_unet
    assert reference.dtype == torch.bfloat16 and not any(p.requires_grad for p in reference.parameters())
    assert all(p.dtype == torch.float32 for p in params)                        # what trains stays in float32


def test_tensorboard_logs_each_epochs_metrics_and_is_refused_without_its_package(tiny_dir, prompt_file, tmp_path,
                                                                                 monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    ddpo.main(["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(out), "--num-epochs", "2",
               "--resolution", "32", "--num-steps", "2", "--sample-batch-size", "2", "--sample-batches-per-epoch", "1",
               "--train-batch-size", "2", "--gradient-accumulation-steps", "1", "--device", "cpu", "--tensorboard"])
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    rows = bookkeeping.read_metrics(out)
    logged = [(e.step, e.value) for e in events.Scalars("reward_mean")]
    assert logged == [(r["epoch"], pytest.approx(r["reward_mean"], rel=1e-6)) for r in rows] and len(logged) == 2
    assert {"loss", "approx_kl", "seconds"} <= set(events.Tags()["scalars"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "tensorboard" else real_find_spec(name))
    with pytest.raises(common.UserError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        ddpo.main(["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(tmp_path / "other"),
                   "--device", "cpu", "--tensorboard"])


MALLOC_PROBE = """
import resource, sys, torch
from plumbing import distributed
size = int(sys.argv[1])  # MiB a tensor
for setting in sys.argv[2:]:  # [no-]checkpointing: as parse_args sets it up; else one of distributed's functions
    if setting.endswith("checkpointing"):
        distributed.setup("cpu", save_memory=setting == "checkpointing")
    else:
        getattr(distributed, setting)()
def resident(): return int(open("/proc/self/statm").read().split()[1]) * 4096
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # pages the system handed out
torch.ones(1)
start = resident()
for round in range(6):  # a UNet pass's pattern, over and over: the last two rounds' pages are counted
    if round == 4:
        counted = faults()
    tensors = [torch.ones(size * 2 ** 18) for _ in range(256 // size)]  # 256 MiB, freed below as a backward frees
    del tensors                                                          # its temporaries
print(faults() - counted, (resident() - start) / 2 ** 20)
"""


def malloc_probe(size, *settings):
    """(pages handed out in two rounds of 256 MiB of `size` MiB tensors, MiB the process grew) under glibc's
    default or the settings given, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, str(size), *settings], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    faults, grown = out.stdout.split()[-2:]
    return int(faults), float(grown)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or platform.libc_ver()[0] != "glibc",
                    reason="glibc on Linux")
def test_freed_tensors_go_back_to_the_system_on_the_cpu_with_gradient_checkpointing():
    """Without --gradient-checkpointing (distributed.setup's save_memory) freed 16 MiB tensors are kept for the next
    ones: the process stays 256 MiB bigger; with it they are given back. (glibc's default sometimes keeps them,
    sometimes not, by where its heap lands, so it is no baseline here; the 64 MiB test below has one.)"""
    assert malloc_probe(16, "no-checkpointing")[1] >= 200 and malloc_probe(16, "checkpointing")[1] < 16


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or platform.libc_ver()[0] != "glibc",
                    reason="glibc on Linux")
def test_without_checkpointing_freed_tensors_serve_the_next_ones_instead_of_fresh_pages():
    """glibc's default gives each tensor over 32 MiB fresh zeroed pages from the system, which a UNet pass at 512 px
    pays hundreds of thousands of times; keep_freed_memory serves them from the memory of the tensors freed before.
    return_freed_memory, made after it, undoes it."""
    import resource  # Unix only
    pages = 2 * 2 ** 28 // resource.getpagesize()  # two counted rounds of 256 MiB
    assert malloc_probe(64)[0] > 0.9 * pages  # what the setting is for, so that the test below can fail
    kept, grown = malloc_probe(64, "keep_freed_memory")
    assert kept < 0.05 * pages and grown >= 200  # the price: the memory is held
    returned, grown = malloc_probe(64, "keep_freed_memory", "return_freed_memory")
    assert returned > 0.9 * pages and grown < 16


@pytest.mark.parametrize("name", ["ddpo", "d3po", "prdp"])
def test_an_epochs_trajectories_are_freed_before_the_next_epoch_samples(tiny_dir, prompt_file, tmp_path, monkeypatch,
                                                                        name):
    """Nothing of an epoch's samples is kept (on the GPU) while the next epoch samples: its latents are gone."""
    refs, alive, sample_epoch = [], [], common.sample_epoch

    def watched(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in refs))  # earlier epochs' latents, still held somewhere
        prompts, samples = sample_epoch(*args, **kwargs)
        refs.append(weakref.ref(samples.latents))
        return prompts, samples
    monkeypatch.setattr(common, "sample_epoch", watched)
    own = {"ddpo": ["--sample-batch-size", "2", "--train-batch-size", "2"],
           "d3po": ["--sample-batch-size", "2", "--train-batch-size", "2"],
           "prdp": ["--sample-batch-size", "2", "--train-batch-size", "2", "--images-per-prompt", "2",
                    "--grad-steps-per-epoch", "1"]}[name]
    {"ddpo": ddpo, "d3po": d3po, "prdp": prdp}[name].main(
        ["--model", tiny_dir, "--prompt-file", prompt_file, "--output-dir", str(tmp_path / name), "--num-epochs", "3",
         "--resolution", "32", "--num-steps", "2", "--sample-batches-per-epoch", "1", "--gradient-accumulation-steps",
         "1", "--device", "cpu", *own])
    assert alive == [0, 0, 0]


def test_logged_tensors_are_read_at_the_epochs_end_not_in_the_training_loop():
    """Reading a CUDA tensor as a number waits for the GPU: the loop keeps the tensors, epoch_metrics reads them."""
    info, timer = {}, SimpleNamespace(seconds=1.0)
    bookkeeping.log_info(info, loss=torch.tensor(2.0, requires_grad=True) * 1, pairs=3)
    bookkeeping.log_info(info, loss=torch.tensor(4.0), pairs=5)
    assert all(torch.is_tensor(x) and not x.requires_grad for x in info["loss"]), info
    row = bookkeeping.epoch_metrics(0, None, info, timer, timer)
    assert row["loss"] == 3.0 and row["pairs"] == 4.0 and isinstance(row["loss"], float)


def test_the_side_by_side_with_trl_times_the_median_epoch_after_the_first():
    """benchmarks/memory.py's epoch time (issue 36's measure): the first epoch's warm-up (compiling, first-call
    setup) left out, the median of the rest; a one-epoch run is that epoch."""
    import memory
    assert memory.typical([100.0, 5.0, 9.0, 6.0]) == 6.0
    assert memory.typical([100.0, 5.0, 7.0]) == 6.0
    assert memory.typical([9.0]) == 9.0


def test_each_epochs_reference_log_probs_come_out_of_that_epochs_sampling():
    """benchmarks/memory.py's phases: the reference log-probs, timed inside sampling, are each epoch's own (the first
    epoch's two slow calls must not leak into the later epochs' sampling), and so is the writing of outputs."""
    import memory
    rows = [dict(sample_seconds=50.0, train_seconds=30.0), dict(sample_seconds=12.0, train_seconds=8.0),
            dict(sample_seconds=14.0, train_seconds=10.0), dict(sample_seconds=13.0, train_seconds=9.0)]
    reference = [(0, 20.0), (0, 20.0), (1, 2.0), (2, 3.0), (3, 1.0), (3, 1.5)]  # (epoch, seconds) of each call
    writing = [(0, 1.0), (1, 0.5), (2, 0.5), (3, 1.5)]
    out = memory.phases(rows, writing, reference)
    # by hand, epochs 1-3: sampling 12-2=10, 14-3=11, 13-2.5=10.5; reference 2, 3, 2.5; epoch 20.5, 24.5, 23.5
    assert out == {"sampling_s": 10.5, "reference_s": 2.5, "training_s": 9.0, "epoch_s": 23.5}


def test_the_flop_count_includes_cpu_attention_by_the_hand_formula():
    """benchmarks/flops.py (issue 36's floor): torch counts no FLOPs for CPU flash attention unless told; by hand,
    the forward is QK^T and PV, 2 B H L S D each, and the backward recomputes QK^T and makes dP, dV, dQ and dK."""
    import flops
    B, H, L, S, D = 2, 3, 16, 8, 4
    q, k, v = torch.randn(B, H, L, D, requires_grad=True), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    attention = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    assert flops.count_flops(attention) == 2 * (2 * B * H * L * S * D)
    assert flops.count_flops(lambda: attention().sum().backward()) == 7 * (2 * B * H * L * S * D)


def test_the_flops_benchmark_times_both_passes_of_the_scripts(tiny_dir, tmp_path):
    """Its table on the tiny pipeline: a training pass is the sampling forward's FLOPs plus a backward's, which for
    LoRA needs input gradients only (about a forward's FLOPs; attention's 2.5 times), no frozen weight's gradient
    (another forward's): 1.5 to 2.5 forwards in all (SD v1.5's: 2.2; full fine-tuning's: over 3)."""
    import flops
    flops.main(["--model", tiny_dir, "--repeat", "1", "--batch", "2", "--results", str(tmp_path)])
    rows = {line[:20].strip(): line[20:].split() for line in (tmp_path / "flops_cpu_no_batch2.txt").read_text()
            .splitlines() if line.startswith(("sampling forward", "training pass"))}
    forward, training = float(rows["sampling forward"][0]), float(rows["training pass"][0])
    assert forward > 0 and 1.5 < training / forward < 2.5, rows
    assert all(float(row[1]) > 0 for row in rows.values()), rows


def test_the_benchmarks_find_their_pipeline_in_one_place(tmp_path, monkeypatch):
    """memory.pipeline, for memory.py, flops.py and gpu_check.py: tiny is made afresh, a given one is used as it
    is, and the random SD v1.5 is made in the cache only where it is not yet."""
    import memory
    made = []
    monkeypatch.setattr(memory, "make_sd15", made.append)
    assert os.path.isfile(os.path.join(memory.pipeline("tiny", name="test"), "model_index.json"))
    assert memory.pipeline(str(tmp_path / "given")) == str(tmp_path / "given") and made == []
    assert memory.pipeline(cache=str(tmp_path / "sd")) == str(tmp_path / "sd") and made == [str(tmp_path / "sd")]
    (tmp_path / "sd" / "model_index.json").parent.mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    assert memory.pipeline(cache=str(tmp_path / "sd")) == str(tmp_path / "sd") and len(made) == 1
