"""Peak memory and seconds of one epoch at Stable Diffusion v1.5's size, with random weights (no download).

    python benchmarks/memory.py                                  # the three scripts on the CPU (minutes each)
    python benchmarks/memory.py --scripts ddpo --gradient-checkpointing both
    python benchmarks/memory.py --scripts ddpo --trl-python /path/to/trl-venv/bin/python   # beside TRL's DDPO
    python benchmarks/memory.py --device cuda                    # a GPU: fp16, the papers' 50 / 20 / 50 steps
    python benchmarks/memory.py --model tiny --scripts ddpo --samples 16 --steps 20 --epochs 3 --trl-python ...
                                              # speed beside TRL on a tiny pipeline (32 px), memory aside

The pipeline has SD v1.5's UNet, VAE and text encoder (a tiny tokenizer: the text encoder's embedding table is
smaller), built from configs and saved once into --cache. Each run is its own process, so that its peak is its
own: one epoch of LoRA rank 4, one sample a sampling batch (D3PO: one pair; PRDP: one prompt's two images, UNet
batches of one in training), a training batch of one, 512 px, the JPEG-compressibility reward; 4 denoising steps
on the CPU, the papers' 50 (DDPO, PRDP) or 20 (D3PO) on a GPU. It prints the peak resident memory of the process
(and CUDA's peak allocated and reserved memory), and the seconds of sampling, reference log-probs and training
(the median epoch after the first, with --epochs over 1);
an epoch's seconds also count writing its outputs (grid, metrics, curves, checkpoint), as TRL's count all it does.

--trl-python runs Hugging Face TRL 0.23.1's DDPOTrainer (its last release with DDPO) on the same pipeline and
settings, with the Python of a virtual environment where trl is installed (never a dependency of this project;
--trl-kept and --trl-returned run it once more with glibc set as this project's scripts set it, like for like):
    python -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 && /tmp/trl/bin/pip install trl==0.23.1 \\
        diffusers==0.42.1 transformers==5.23.0 peft==0.21.2
Ratios are meaningful only within one invocation (machines of one kind differ about 3x in speed).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project, for a benchmark run as python benchmarks/memory.py
GIB = 2 ** 30
STEPS = {"cpu": {"ddpo": 4, "d3po": 4, "prdp": 4}, "cuda": {"ddpo": 50, "d3po": 20, "prdp": 50}}
FLAGS = {"ddpo": ["--sample-batch-size", "1", "--sample-batches-per-epoch", "1", "--train-batch-size", "1",
                  "--gradient-accumulation-steps", "1"],
         "d3po": ["--sample-batch-size", "2", "--sample-batches-per-epoch", "1", "--train-batch-size", "2",
                  "--gradient-accumulation-steps", "1"],
         "prdp": ["--sample-batch-size", "2", "--sample-batches-per-epoch", "1", "--train-batch-size", "1",
                  "--gradient-accumulation-steps", "2", "--images-per-prompt", "2", "--grad-steps-per-epoch", "1"]}


SD15 = os.path.join(os.path.expanduser("~"), ".cache", "ddpo-d3po-prdp", "sd15-random")  # --cache's default


def pipeline(model=None, cache=SD15, name="memory"):
    """The pipeline directory a benchmark runs: "tiny" (tiny_pipeline.py's, made afresh under /tmp/<name>-tiny-*),
    another that is given, or the random SD v1.5 in `cache`, made there the first time."""
    if model == "tiny":
        from tiny_pipeline import make_tiny_pipeline  # beside this file
        return make_tiny_pipeline(os.path.join("/tmp", f"{name}-tiny-{os.getpid()}"))
    if model:
        return model
    if not os.path.isfile(os.path.join(cache, "model_index.json")):
        make_sd15(cache)
    return cache


def make_sd15(path):
    """A StableDiffusionPipeline of SD v1.5's architecture with random weights, saved to `path` (about 4 GB)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from toy_model.make import write_tokenizer
    torch.manual_seed(0)
    tokenizer = write_tokenizer(os.path.join(path + ".tokenizer"), ["a", "photo", "of", "cat", "dog", "horse"], 77)
    text_encoder = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text tower, as SD v1.5's
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(path)
    print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, VAE "
          f"{sum(p.numel() for p in vae.parameters()) / 1e6:.0f} M, text encoder "
          f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.0f} M; saved to {path}", flush=True)


def peaks(device):
    import resource

    import torch
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    if device == "cuda":
        out.update(cuda_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                   cuda_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    return out


def child_ours(job):
    """One epoch of one of the project's scripts, in this process; its phases timed from its own metrics."""
    import importlib

    from plumbing import bookkeeping
    import common
    module = importlib.import_module(job["script"])
    reference, writing = [], []  # (epoch, seconds) of each call

    def timed(function, times):
        def wrapper(*args, **kwargs):
            start, epoch = time.perf_counter(), len(writing)  # the epoch: how many have ended before this call
            try:
                return function(*args, **kwargs)
            finally:
                times.append((epoch, time.perf_counter() - start))
        return wrapper
    common.reference_log_probs = timed(common.reference_log_probs, reference)
    bookkeeping.end_epoch = timed(bookkeeping.end_epoch, writing)  # the epoch's grid, metrics, curves, checkpoint
    import resource
    loaded, sampled, load, sample_ = [0.0], [0.0], common.load_policy, common.sample_epoch

    def load_policy(*args, **kwargs):  # the peak so far after loading, and after sampling: where the peak is
        out = load(*args, **kwargs)
        loaded[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        return out

    def sample_epoch(*args, **kwargs):
        out = sample_(*args, **kwargs)
        sampled[0] = max(sampled[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB)
        return out
    common.load_policy, common.sample_epoch = load_policy, sample_epoch
    module.main(job["argv"])
    return {**phases(bookkeeping.read_metrics(job["output_dir"]), writing, reference),
            "rss_after_loading_gib": loaded[0], "rss_after_sampling_gib": sampled[0]}


def phases(rows, writing, reference):
    """Each phase's seconds an epoch (typical, below) from the run's metrics rows and the timed calls of writing
    an epoch's outputs and of the reference log-probs, (epoch, seconds) each. The reference log-probs are timed
    inside sampling: each epoch's are taken out of that epoch's sampling."""
    ref = [sum(seconds for epoch, seconds in reference if epoch == i) for i in range(len(rows))]
    write = [sum(seconds for epoch, seconds in writing if epoch == i) for i in range(len(rows))]
    return {"sampling_s": typical([row["sample_seconds"] - r for row, r in zip(rows, ref)]),
            "reference_s": typical(ref), "training_s": typical([row["train_seconds"] for row in rows]),
            "epoch_s": typical([row["sample_seconds"] + row["train_seconds"] + w for row, w in zip(rows, write)])}


def typical(seconds):
    """An epoch's seconds: the median of the epochs after the first (its warm-up apart), or the one epoch run."""
    return statistics.median(seconds[1:] or seconds)


def child_trl(job):
    """One epoch of TRL's DDPOTrainer (LoRA rank 4, as its pipeline makes it) on the same pipeline and settings."""
    import io

    import numpy as np
    import torch
    from accelerate import PartialState
    from PIL import Image
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
    PartialState()  # TRL's pipeline logs through accelerate, which wants its state first
    if job.get("malloc"):  # glibc told to give freed memory back, or to keep it, as this project's scripts do
        from plumbing import distributed
        {"returned": distributed.return_freed_memory, "kept": distributed.keep_freed_memory}[job["malloc"]]()

    def compressibility(images, prompts, metadata):
        sizes = []
        for image in images:
            buffer = io.BytesIO()
            array = (image.float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(array).save(buffer, format="JPEG", quality=95)
            sizes.append(-buffer.tell() / 1000)
        return torch.tensor(np.array(sizes)), {}

    batches = job.get("batches") or dict(sample_batch_size=1, sample_num_batches_per_epoch=1, train_batch_size=1,
                                         train_gradient_accumulation_steps=1)
    config = DDPOConfig(num_epochs=job.get("epochs", 1), sample_num_steps=job["steps"], **batches,
                        mixed_precision="fp16" if job["device"] == "cuda" else "no", save_freq=10 ** 6,
                        logdir=job["output_dir"], per_prompt_stat_tracking=True, train_learning_rate=3e-4,
                        per_prompt_stat_tracking_min_count=16, log_with=None)
    pipeline = DefaultDDPOStableDiffusionPipeline(job["model"], use_lora=True)
    if job["gradient_checkpointing"]:
        pipeline.unet.enable_gradient_checkpointing()
    trainer = DDPOTrainer(config, compressibility, lambda: ("cat", {}), pipeline)
    seconds, global_step = [], 0
    for epoch in range(config.num_epochs):  # what trainer.train() does, each epoch timed
        start = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        seconds.append(time.perf_counter() - start)
    return {"epoch_s": typical(seconds)}


def run_child(python, job):
    result = subprocess.run([python, os.path.abspath(__file__), "--child", json.dumps(job)], capture_output=True,
                            text=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise SystemExit(f"{job['label']} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(rows):
    lines = [f"{'run':<48}{'peak RSS GiB':>13}{'(loaded':>8}{'sampled)':>9}{'CUDA alloc':>11}{'reserved':>9}"
             f"{'sampling s':>11}{'reference s':>12}{'training s':>11}{'epoch s':>9}"]
    for r in rows:
        def cell(key, width, fmt):
            return f"{r[key]:{width}{fmt}}" if key in r else f"{'-':>{width}}"
        lines.append(f"{r['label']:<48}{cell('peak_rss_gib', 13, '.2f')}{cell('rss_after_loading_gib', 8, '.2f')}"
                     f"{cell('rss_after_sampling_gib', 9, '.2f')}{cell('cuda_allocated_gib', 11, '.2f')}"
                     f"{cell('cuda_reserved_gib', 9, '.2f')}{cell('sampling_s', 11, '.1f')}"
                     f"{cell('reference_s', 12, '.1f')}{cell('training_s', 11, '.1f')}{cell('epoch_s', 9, '.1f')}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=["ddpo", "d3po", "prdp"], choices=["ddpo", "d3po", "prdp"])
    parser.add_argument("--gradient-checkpointing", default="both", choices=["off", "on", "both"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--trl-python", help="the python of a virtual environment with trl 0.23.1: DDPO beside it")
    parser.add_argument("--trl-returned", action="store_true", help="also run TRL with freed memory given back "
                        "to the system, as this project's scripts do with checkpointing (distributed."
                        "return_freed_memory): like for like")
    parser.add_argument("--trl-kept", action="store_true", help="also run TRL with freed memory kept for the next "
                        "tensors, as this project's scripts do without checkpointing (distributed.keep_freed_memory)")
    parser.add_argument("--cache", default=SD15, help="where the random SD v1.5 is saved")
    parser.add_argument("--model", help="another pipeline instead (tiny: benchmarks/tiny_pipeline.py's, 32 px)")
    parser.add_argument("--resolution", type=int, help="pixels (default: 512; 32 with --model tiny)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 4 on the CPU, the papers' on a GPU)")
    parser.add_argument("--samples", type=int, help="DDPO only: this many samples an epoch in batches of 8, "
                                                    "training batches of 4, 2 accumulated (DDPO's reference)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs a run (times: the median epoch after the "
                        "first, whose warm-up is left out; with one epoch, that epoch)")
    parser.add_argument("--repeat", type=int, default=1, help="run every job this many times, in turn (ours, TRL, "
                        "ours, TRL, ...): the ratios pair each run with its neighbour, and their spread is printed")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        job = json.loads(opts.child)
        times = (child_trl if job["script"] == "trl" else child_ours)(job)
        print("RESULT " + json.dumps(times | peaks(job["device"])), flush=True)
        return
    model = pipeline(opts.model, opts.cache)
    if opts.samples and opts.scripts != ["ddpo"]:
        parser.error("--samples sets DDPO's batches: give --scripts ddpo")
    size = opts.resolution or (32 if opts.model == "tiny" else 512)  # TRL samples at the model's own size
    flags, trl_batches = dict(FLAGS), None
    if opts.samples:
        batch, batches = min(8, opts.samples), max(1, opts.samples // 8)
        flags["ddpo"] = ["--sample-batch-size", str(batch), "--sample-batches-per-epoch", str(batches),
                         "--train-batch-size", "4", "--gradient-accumulation-steps", "2"]
        trl_batches = dict(sample_batch_size=batch, sample_num_batches_per_epoch=batches, train_batch_size=4,
                           train_gradient_accumulation_steps=2)
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[opts.gradient_checkpointing]
    jobs = []
    for script in opts.scripts:
        for gc in checkpointing:
            label = f"{script}.py{' +checkpointing' * gc}"
            out = os.path.join("/tmp", f"memory-{script}-{int(gc)}-{os.getpid()}")
            steps = opts.steps or STEPS[opts.device][script]
            argv = ["--model", model, "--output-dir", out, "--num-epochs", str(opts.epochs), "--num-steps", str(steps),
                    "--lora-rank", "4", "--device", opts.device, "--reward", "jpeg_compressibility",
                    *(["--resolution", str(size)] if size else []), *flags[script],
                    *(["--gradient-checkpointing"] * gc)]
            jobs.append((sys.executable, dict(label=label, script=script, argv=argv, output_dir=out,
                                              device=opts.device)))
            mallocs = [None] + ["returned"] * opts.trl_returned + ["kept"] * opts.trl_kept  # glibc's default first
            for malloc in mallocs if script == "ddpo" and opts.trl_python else []:
                jobs.append((opts.trl_python, dict(
                    label=f"TRL 0.23.1 DDPOTrainer{' +checkpointing' * gc}{f' +{malloc}' if malloc else ''}",
                    script="trl", model=model, output_dir=out + "-trl", steps=steps, device=opts.device,
                    epochs=opts.epochs, gradient_checkpointing=gc, batches=trl_batches, malloc=malloc)))
    rows = []
    for k, (python, job) in enumerate(jobs * opts.repeat):  # in turn, so that a drift in speed falls on both
        out = f"{job['output_dir']}-{k}"  # each run its own output directory
        job = dict(job, output_dir=out, argv=[out if a == job["output_dir"] else a for a in job.get("argv", [])])
        print(f"running {job['label']} ...", flush=True)
        rows.append({"label": job["label"]} | run_child(python, job))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    runs = {}  # label -> its rows, in order
    for r in rows:
        runs.setdefault(r["label"], []).append(r)
    text = [f"{'one epoch at SD v1.5' if opts.model is None else opts.model}, {size or 'its own'} px, LoRA rank 4, "
            f"{opts.device}, {time.strftime('%Y-%m-%d')}: {' '.join(sys.argv[1:])}", table(rows)]

    def ratio(mine, theirs, key):  # each run of ours over the run of theirs beside it; the median and the range
        values = sorted(m[key] / t[key] for m, t in zip(runs[mine], runs[theirs]))
        spread = f" (from {values[0]:.2f} to {values[-1]:.2f}, {len(values)} pairs)" if len(values) > 1 else ""
        return f"{values[len(values) // 2]:.2f}{spread}"
    for gc in checkpointing:
        suffix = " +checkpointing" * gc
        for malloc in ("", " +returned", " +kept"):
            trl = f"TRL 0.23.1 DDPOTrainer{suffix}{malloc}"
            if trl in runs and f"ddpo.py{suffix}" in runs:
                text.append(f"ddpo.py{suffix} / TRL{suffix}{malloc}: peak RSS "
                            f"{ratio(f'ddpo.py{suffix}', trl, 'peak_rss_gib')}, "
                            f"epoch time {ratio(f'ddpo.py{suffix}', trl, 'epoch_s')}")
    if opts.trl_python and len(checkpointing) == 2 and "ddpo.py +checkpointing" in runs:
        text.append(f"ddpo.py +checkpointing / TRL: peak RSS "
                    f"{ratio('ddpo.py +checkpointing', 'TRL 0.23.1 DDPOTrainer', 'peak_rss_gib')}")
    print("\n" + "\n".join(text))
    os.makedirs(opts.results, exist_ok=True)
    name = (f"memory_{'tiny_' * (opts.model == 'tiny')}{opts.device}_{'_'.join(opts.scripts)}"
            f"{'' if opts.gradient_checkpointing == 'both' else '_checkpointing_' + opts.gradient_checkpointing}.txt")
    with open(os.path.join(opts.results, name), "w") as f:
        f.write("\n".join(text) + "\n")
    with open(os.path.join(opts.results, name.replace(".txt", ".json")), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
