"""What only a GPU can show, in one command of at most about 8 minutes: run it whenever a GPU is lent.

    python benchmarks/gpu_check.py              # one GPU: SD v1.5's size (random weights), 512 px, fp16, LoRA rank 4
    python benchmarks/gpu_check.py --reduced    # the same code on the CPU, a tiny pipeline at 32 px (tests run this)

1. One epoch of each script (benchmarks/memory.py's runs: one sample a sampling batch, a training batch of one,
   the papers' 50 / 20 / 50 denoising steps, the JPEG-compressibility reward), with and without
   --gradient-checkpointing, each in its own process: CUDA's peak allocated and reserved memory, the seconds of
   sampling, reference log-probs and training, and trajectories per second (images sampled and trained on an epoch,
   over the epoch's seconds).
2. The log-prob drift: the policy samples 4 images in one batch and stores each step's log-prob; the same policy,
   before any update, recomputes them in training batches of 2, as the scripts do. Their difference is the
   log-ratio log pi_theta / pi_old that DDPO's and PRDP's clips see at an epoch's first step, and that D3PO sees
   against its reference: it should be 0. Measured in float32, fp16 and bf16 autocast (one more process for the
   three); its largest |value| is set beside DDPO's clip range (1e-4, per element), PRDP's eps (Table 4: 1e-6)
   and D3PO's ratio clamp (0.1).
3. The host-device synchronisations of one DDPO epoch (10 steps), each counted at the project's line that asked for
   it (torch.cuda.set_sync_debug_mode("warn")): a sync makes Python wait until the GPU's queue is empty, and one per
   training call would show in the table as a multiple of the steps (none is expected: docs/scale.md, "Waiting for
   the GPU"; sampling waits once a step, for its noise drawn on the CPU).
4. The UNet's two passes at 512 px in fp16, a batch of one (benchmarks/flops.py): their FLOPs and FLOP/s beside an
   fp16 matmul's, the GPU's arithmetic ceiling. Far below it, the GPU waits for the host (Python launching the
   kernels, syncs): the time one implementation can still save over another (issue 36, on a GPU).
5. benchmarks/results/gpu_check.json and .md (with --reduced: gpu_check_reduced.*): the date, the device, the
   versions, and the tables. ddpo-pytorch reports about 0.22 trajectories per second per A100 and 10-16 GB at
   512 px with LoRA; the table says so beside ours.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

import memory  # beside this file; it puts the project on the path

ROOT = memory.ROOT
CLIPS = {"DDPO clip range": 1e-4, "PRDP eps (Table 4)": 1e-6, "D3PO ratio clamp": 0.1}
IMAGES = {"ddpo": 1, "d3po": 2, "prdp": 2}  # an epoch of memory.FLAGS


def drift(model, device, precision, steps, resolution):
    """Max |log pi_theta - log pi_old| per element, of every stored step, recomputed in batches of 2 before any update."""
    import torch

    from plumbing import bookkeeping
    import common
    import ddpo
    args = bookkeeping.parse_args(ddpo.Args, ["--model", model, "--device", device, "--mixed-precision", precision,
                                              "--num-steps", str(steps), "--resolution", str(resolution),
                                              "--sample-batch-size", "4", "--sample-batches-per-epoch", "1",
                                              "--lora-rank", "4", "--output-dir", "unused"])
    policy, _ = common.load_policy(args)
    policy.pipe.unet.eval()
    generator = torch.Generator("cpu").manual_seed(0)
    _, samples = common.sample_epoch(policy, args, ["a photo of a cat"], generator, progress=False)
    worst = 0.0
    with torch.no_grad():
        for start in (0, 2):
            idx = torch.arange(start, start + 2, device=samples.latents.device)
            for s in range(steps):
                again = common.log_prob(policy, samples, idx, s)
                worst = max(worst, float((again - samples.log_probs[idx, s]).abs().max()))
    return {"precision": precision, "max_abs_log_ratio": worst}


SYNC = "called a synchronizing CUDA operation"  # torch's warning under torch.cuda.set_sync_debug_mode("warn")


def project_line(skip="benchmarks"):
    """'path:line code' of the innermost frame on the stack that is the project's own (not in the folder skip, nor a
    library in a virtual environment inside the project), or None."""
    import traceback
    ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(ROOT + os.sep) and "-packages" not in
            f.filename and not f.filename.startswith(os.path.join(ROOT, skip) + os.sep)]
    return f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno} {ours[-1].line}" if ours else None


def count_syncs(run):
    """Call run() and count the CUDA synchronisations it warns of, each at the innermost line of the project on the
    stack (not benchmarks/, nor a library in a virtual environment inside it): [(line, count)], most first. Other
    warnings are shown as usual."""
    import collections
    import warnings
    sites, show = collections.Counter(), warnings.showwarning

    def note(message, category, filename, lineno, file=None, line=None):
        if SYNC not in str(message):
            return show(message, category, filename, lineno, file, line)
        sites[project_line() or f"{filename}:{lineno}"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every sync, not the first of each line
        warnings.showwarning = note
        run()
    return sites.most_common()


def syncs(model, device, steps, resolution):
    """One DDPO epoch (memory.py's: one sample, a training batch of one) with its CUDA synchronisations counted; on a
    CPU the same epoch runs with the counter in place and counts none."""
    import tempfile

    import torch
    import ddpo
    argv = ["--model", model, "--output-dir", tempfile.mkdtemp(prefix="gpu-check-syncs-"), "--num-epochs", "1",
            "--num-steps", str(steps), "--lora-rank", "4", "--device", device, "--reward", "jpeg_compressibility",
            "--resolution", str(resolution), *memory.FLAGS["ddpo"]]
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    try:
        sites = count_syncs(lambda: ddpo.main(argv))
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    return {"kind": "syncs", "steps": steps, "cuda": device == "cuda", "sites": sites}


def passes(model, device, precision):
    """benchmarks/flops.py's measure: the UNet's two passes at memory.py's setting (a batch of one), their FLOP/s
    beside a matmul's of the same precision: how near the GPU's arithmetic the passes run (docs/scale.md)."""
    import flops
    return {"kind": "flops", "precision": precision, **flops.measure(model, device, precision)}


def child(jobs):
    """The drift checks, the sync count and the FLOP rates, one process for all (each start costs an import of torch
    and a model load); a job that fails is reported as such and the next one still runs."""
    for job in jobs:
        job = dict(job)
        kind = job.pop("kind", "drift")
        try:
            result = {"syncs": syncs, "flops": passes, "drift": drift}[kind](**job)
        except Exception as e:
            result = {"kind": kind, "precision": job.get("precision"), "error": f"{type(e).__name__}: {e}"[:200]}
        print("RESULT " + json.dumps(result), flush=True)


def run_children(jobs):
    """child(jobs) in a process of its own: the results in the jobs' order, those it died before as errors."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(jobs)],
                            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    done = [json.loads(line[len("RESULT "):]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    crash = (result.stderr.strip().splitlines() or ["?"])[-1][:200]
    return done + [{"kind": job.get("kind", "drift"), "precision": job.get("precision"), "error": crash}
                   for job in jobs[len(done):]]


def versions():
    import diffusers
    import peft
    import torch
    import transformers
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": sys.version.split()[0]}


def markdown(report):
    lines = [f"GPU check, {report['date']}, {report['device']}; " + ", ".join(f"{k} {v}" for k, v in
                                                                            report["versions"].items()), "",
             f"One epoch, {report['setting']}:", "",
             "| run | CUDA peak allocated GiB | reserved GiB | peak RSS GiB | sampling s | reference s | training s "
             "| epoch s | trajectories/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["epochs"]:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("cuda_allocated_gib", "cuda_reserved_gib",
                                                            "peak_rss_gib", "sampling_s", "reference_s",
                                                            "training_s", "epoch_s", "trajectories_per_s")]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += ["", "ddpo-pytorch (the DDPO authors' PyTorch port) reports about 0.22 trajectories/s per A100 and "
              "10-16 GB at 512 px with LoRA.", "", "Log-prob drift before any update (per element; 0 is exact):", "",
              "| precision | max abs log-ratio | " + " | ".join(f"within {k} {v:g}" for k, v in CLIPS.items()) + " |",
              "|---|---|" + "---|" * len(CLIPS)]
    for d in report["drift"]:
        if "error" in d:
            lines.append(f"| {d['precision']} | failed: {d['error']} |" + " |" * len(CLIPS))
            continue
        lines.append(f"| {d['precision']} | {d['max_abs_log_ratio']:.3g} | " + " | ".join(
            "yes" if d["max_abs_log_ratio"] <= v else "no" for v in CLIPS.values()) + " |")
    counted = report["syncs"]
    lines += ["", f"Host-device synchronisations in one DDPO epoch ({counted.get('steps')} steps: as many sampling "
              "and training calls), at the project's line that asked for each:", ""]
    if "error" in counted:
        lines.append(f"failed: {counted['error']}")
    elif not counted["cuda"]:
        lines.append("not counted: no CUDA here (the epoch ran with the counter in place)")
    else:
        lines += ["| line | syncs |", "|---|---|"] + [f"| `{site}` | {n} |" for site, n in counted["sites"]]
    rates = report["flops"]
    lines += ["", f"The UNet's passes (benchmarks/flops.py, a batch of one, {rates.get('precision')}) against a "
              "matmul's rate:", ""]
    if "error" in rates:
        lines.append(f"failed: {rates['error']}")
    else:
        import flops
        lines += ["```", *flops.table(rates), "```"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="the CPU and a tiny pipeline (a test of this script)")
    parser.add_argument("--cache", default=memory.SD15, help="where the random SD v1.5 is saved")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        return child(json.loads(opts.child))
    import torch
    if opts.reduced:
        model, device, resolution = memory.pipeline("tiny", name="gpu-check"), "cpu", 32
        precisions, runs = ["no", "bf16"], [("ddpo", False), ("ddpo", True), ("d3po", False), ("prdp", False)]
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run it where one is, or give --reduced")
        model, device, resolution = memory.pipeline(cache=opts.cache), "cuda", 512
        precisions, runs = ["no", "fp16", "bf16"], [(s, gc) for s in ("ddpo", "d3po", "prdp") for gc in (False, True)]
    epochs = []
    for script, gc in runs:
        label = f"{script}.py{' +checkpointing' * gc}"
        out = f"/tmp/gpu-check-{script}-{int(gc)}-{os.getpid()}"
        steps = 2 if opts.reduced else memory.STEPS["cuda"][script]
        argv = ["--model", model, "--output-dir", out, "--num-epochs", "1", "--num-steps", str(steps),
                "--lora-rank", "4", "--device", device, "--reward", "jpeg_compressibility", "--resolution",
                str(resolution), *memory.FLAGS[script], *(["--gradient-checkpointing"] * gc)]
        print(f"running {label} ...", flush=True)
        row = {"label": label} | memory.run_child(sys.executable, dict(label=label, script=script, argv=argv,
                                                                        output_dir=out, device=device))
        row["trajectories_per_s"] = IMAGES[script] / row["epoch_s"]
        epochs.append(row)
    print("log-prob drift, syncs and FLOP rates ...", flush=True)
    *drifts, counted, rates = run_children(
        [dict(model=model, device=device, precision=p, steps=2 if opts.reduced else 50, resolution=resolution)
         for p in precisions]
        + [dict(kind="syncs", model=model, device=device, steps=2 if opts.reduced else 10, resolution=resolution),
           dict(kind="flops", model=model, device=device, precision="no" if opts.reduced else "fp16")])
    report = {"date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU (reduced mode)",
              "versions": versions(), "epochs": epochs, "drift": drifts, "syncs": counted, "flops": rates,
              "setting": (f"{'a tiny pipeline, 32 px, 2 steps, CPU' if opts.reduced else 'SD v1.5 size, 512 px, fp16'}"
                          f", LoRA rank 4, one sample a sampling batch (D3PO: a pair; PRDP: a prompt's two images)")}
    os.makedirs(opts.results, exist_ok=True)
    name = "gpu_check_reduced" if opts.reduced else "gpu_check"
    with open(os.path.join(opts.results, name + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(opts.results, name + ".md"), "w") as f:
        f.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
