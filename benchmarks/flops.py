"""How near the machine's arithmetic ceiling the UNet's passes run: the floor under any DDPO's epoch.

    python benchmarks/flops.py                 # SD v1.5's size (memory.py's random weights), 512 px, CPU, fp32
    python benchmarks/flops.py --model tiny    # the tiny pipeline at 32 px: far from the ceiling, Python's time
    python benchmarks/flops.py --device cuda --mixed-precision fp16

Times the two UNet passes every script's epoch is made of, through the scripts' own functions (LoRA rank 4,
guidance 5, --batch samples, twice that in the UNet): a sampling step's guided forward without gradients
(common.guided_noise_pred) and a training call's forward and backward (common.log_prob, then backward). It counts
their floating-point operations (torch.utils.flop_counter, given CPU flash attention's formula, which torch does not
register) and times a square matmul of the same precision, the fastest work the machine does. An implementation
that makes the same passes with the same kernels (TRL's DDPOTrainer does: docs/scale.md) can be faster only by the
time outside the passes, or with faster kernels (fused, compiled), whose room is the gap to the matmul's rate.
"""
import argparse
import os
import sys
import time

import torch
import torch.utils.flop_counter as flop_counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project, for a benchmark run as python benchmarks/flops.py
import common  # noqa: E402
from plumbing import distributed  # noqa: E402

FORMULAS = {  # q (B, H, L, D), k and v (B, H, S, D): QK^T and PV, 2 B H L S D each; the backward 2.5 times that
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_backward_flop_count(grad, q, k, v)}


def count_flops(fn):
    """Floating-point operations of fn() (a multiply-add is two), all attention kernels included."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def seconds(fn, device, repeat):
    """The fastest of `repeat` timed calls of fn, after one untimed."""
    times = []
    for _ in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def measure(model, device, mixed_precision="no", batch=1, repeat=2):
    """A matmul's FLOP/s, and the FLOPs and seconds of the sampling forward and the training pass: a dict."""
    device = torch.device(device)
    pipe, params, autocast = common.load_pipeline(model, device, mixed_precision, lora_rank=4)
    policy = common.Policy(pipe, common.encode_prompts(pipe, [""]), num_steps=1, guidance_scale=5.0, eta=1.0,
                           autocast=autocast)
    pipe.scheduler.set_timesteps(1, device=device)
    latents = torch.randn(batch, 2, *common.latent_size(pipe), device=device)  # x_t and x_{t-1} of one step
    samples = common.Trajectories(None, latents, None, pipe.scheduler.timesteps,
                                  common.encode_prompts(pipe, ["a photo of a cat"] * batch))
    idx = torch.arange(batch, device=device)

    def sampling_forward():
        with torch.no_grad():
            common.guided_noise_pred(policy, latents[:, 0], samples.timesteps[0], samples.prompt_embeds)

    def training_pass():
        common.log_prob(policy, samples, idx, 0).sum().backward()

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    a, b = (torch.randn(4096, 4096, device=device, dtype=dtype) for _ in range(2))
    return {"resolution": pipe.resolution, "batch": batch, "matmul_dtype": str(dtype),
            "matmul_flop_per_s": 2 * 4096 ** 3 / seconds(lambda: a @ b, device, 3),
            "passes": [{"pass": name, "flop": count_flops(fn), "seconds": seconds(fn, device, repeat)}
                       for name, fn in (("sampling forward", sampling_forward), ("training pass", training_pass))]}


def table(result):
    """The result's passes as text lines: GFLOP, seconds, GFLOP/s, and the share of the matmul's rate."""
    lines = [f"a {result['matmul_dtype']} matmul (4096 x 4096 x 4096): {result['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s",
             f"{'pass':20s} {'GFLOP':>9s} {'s':>8s} {'GFLOP/s':>8s} {'of matmul':>10s}"]
    for p in result["passes"]:
        rate = p["flop"] / p["seconds"]
        lines.append(f"{p['pass']:20s} {p['flop'] / 1e9:9.2f} {p['seconds']:8.3f} {rate / 1e9:8.0f} "
                     f"{rate / result['matmul_flop_per_s']:10.0%}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="tiny: benchmarks/tiny_pipeline.py's; default: memory.py's random SD v1.5 "
                                        "(made in its --cache if missing)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--batch", type=int, default=1, help="samples a pass (memory.py's epochs: 1 at SD's size; "
                        "sampling 8 and training 4 on the tiny pipeline)")
    parser.add_argument("--repeat", type=int, default=2, help="timed calls of each pass (the fastest counts)")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    opts = parser.parse_args(argv)
    device = torch.device(distributed.setup(opts.device))  # on the CPU, glibc told as the scripts tell it
    from memory import pipeline  # beside this file
    model = pipeline(opts.model, name="flops")
    result = measure(model, device, opts.mixed_precision, opts.batch, opts.repeat)
    lines = [f"{os.path.basename(model.rstrip('/'))}, {result['resolution']} px, LoRA rank 4, a guided batch of "
             f"{opts.batch}, {device}, {opts.mixed_precision}, {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}",
             *table(result)]
    print("\n".join(lines), flush=True)
    os.makedirs(opts.results, exist_ok=True)
    name = f"flops_{'tiny_' * (opts.model == 'tiny')}{device.type}_{opts.mixed_precision}_batch{opts.batch}.txt"
    with open(os.path.join(opts.results, name), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
