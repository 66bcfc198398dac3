"""One objective, three algorithms: DDPO, D3PO and PRDP on the toy model's shape area, side by side.

    python benchmarks/compare.py                     # the three toy presets and PRDP at two more betas, seeds 0 1 2,
                                                     # 4 minutes of training a run (about 75 minutes in all)
    python benchmarks/compare.py --minutes 2 --seeds 0 --settings ddpo d3po      # shorter
    python benchmarks/compare.py --results /tmp/c -- --learning-rate 1e-3        # flags after -- go to every script

Every run trains its script's `--model toy` preset (whose reward is `shape_area`) for the same wall-clock budget
(an alarm stops it; the last finished epoch is measured), and is measured before and after on noise held apart
from training (benchmarks/shapes.py's EVAL_SEED), 16 images for each of the 24 prompts:
- area: the objective, the share of the image the shape covers, in percent; +- the standard error of its change
  from the per-image changes (the same noise before and after);
- alignment: `shapes_alignment` x 100, what the fine-tuned model gives up of following its prompt;
- KL: KL(p_theta || p_ref) of whole trajectories x_T..x_0, in nats, estimated on the fine-tuned model's own
  held-apart samples by the mean of their log-ratio sum_t log pi_theta(x_{t-1}|x_t) / pi_ref(x_{t-1}|x_t) (the
  plain Monte Carlo estimator "k1": unbiased, though single samples can be negative), +- its standard error.
  The log-probs are per-element means (docs/conventions.md), so the sum over steps is multiplied by the
  latent's C x h x w elements to give nats per trajectory.
It prints a table and a summary (mean over seeds +- standard error over seeds) and writes them, the raw
figures (compare.json), one figure (compare.png: the objective against minutes, mean and band over seeds; area
gained against KL and against alignment lost) and before/after grids to --results (benchmarks/results/).
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
from shapes import EVAL_IMAGES_PER_PROMPT, ROOT, fine_tune, measure  # noqa: E402

from plumbing import bookkeeping  # noqa: E402
import common  # noqa: E402
from plumbing.evaluate import mean_se  # noqa: E402

# label: (script, flags): the three presets, then PRDP's at larger betas (its preset's is 0.1: prdp.PRESETS)
SETTINGS = {"ddpo": ("ddpo", []), "d3po": ("d3po", []), "prdp": ("prdp", []),
            "prdp-beta1": ("prdp", ["--beta", "1"]), "prdp-beta10": ("prdp", ["--beta", "10"])}


def run(label, seed, minutes, script_flags, workdir, images_per_prompt, before_cache):
    algorithm, flags = SETTINGS[label]
    args, run_dir, seconds = fine_tune(algorithm, seed, ["--num-epochs", "100000", *flags, *script_flags], workdir,
                                       minutes=minutes, name=label)
    prompts = bookkeeping.load_prompts(args.prompt_file)
    policy, params = common.load_policy(args, reference=True)
    key = (args.prompt_file, args.guidance_scale, args.num_steps, args.eta, images_per_prompt)
    if key not in before_cache:  # every preset samples the same way: the untrained model is measured once
        before_cache[key] = measure(policy, args, prompts, images_per_prompt, kl=True)
    before, before_images = before_cache[key]
    optimizer = common.make_optimizer(params, args.learning_rate, args.weight_decay)
    epochs, _ = bookkeeping.load_checkpoint(policy.pipe, optimizer, common.make_scaler("cpu", "no"), run_dir)
    after, after_images = measure(policy, args, prompts, images_per_prompt, kl=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        log = [json.loads(line) for line in f]
    curve = np.cumsum([0.0] + [row["seconds"] for row in log])[:-1] / 60, [100 * row["reward_mean"] for row in log]
    return {"label": label, "seed": seed, "epochs": epochs, "minutes": seconds / 60, "budget": minutes,
            "area_before": before["area"], "area_after": after["area"],
            "area_gain": mean_se(100 * (after["per_image_area"] - before["per_image_area"])),
            "alignment_before": before["alignment"],
            "alignment_change": mean_se(100 * (after["per_image_alignment"] - before["per_image_alignment"])),
            "kl_before": mean_se(before["kl"]), "kl": mean_se(after["kl"]), "kl_steps": after["kl_steps"].tolist(),
            "curve": [list(map(float, c)) for c in curve]}, before_images, after_images, prompts


def table(results, minutes):
    lines = [f"shape area on held-apart noise, before -> after {minutes:g} minutes of training a run "
             f"(+- standard error of the change, from the per-image changes)",
             f"{'setting':<14}{'seed':>5}{'epochs':>7}  {'area %':<28}{'alignment change':>18}{'KL nats':>16}"]
    for r in results:
        (gain, gain_se), (al, al_se), (kl, kl_se) = r["area_gain"], r["alignment_change"], r["kl"]
        lines.append(f"{r['label']:<14}{r['seed']:>5}{r['epochs']:>7}  "
                     f"{r['area_before']:5.1f} -> {r['area_after']:5.1f} ({gain:+5.1f} +- {gain_se:.2f})"
                     f"{al:>+10.1f} +- {al_se:4.2f}{kl:>9.1f} +- {kl_se:4.1f}")
    lines.append("\nsummary over seeds: mean +- standard error between seeds (smallest area gain)")
    for label in dict.fromkeys(r["label"] for r in results):
        rows = [r for r in results if r["label"] == label]
        (g, g_se), (a, a_se), (k, k_se) = (mean_se([r[key][0] for r in rows])
                                           for key in ("area_gain", "alignment_change", "kl"))
        lines.append(f"{label:<14} area {g:+5.1f} +- {g_se:4.2f} (smallest {min(r['area_gain'][0] for r in rows):+5.1f})"
                     f"   alignment {a:+5.1f} +- {a_se:4.2f}   KL {k:6.1f} +- {k_se:4.1f} nats   "
                     f"({len(rows)} seeds, {np.mean([r['epochs'] for r in rows]):.0f} epochs)")
    lines.append(f"KL: per trajectory (all {len(results[0]['kl_steps'])} steps), in nats, the mean over the fine-tuned "
                 "model's held-apart samples of log p_theta(x_T..x_0) - log p_ref(x_T..x_0) (the k1 estimator); the "
                 f"untrained model's is {results[0]['kl_before'][0]:.2g}.")
    return "\n".join(lines)


def plot(results, minutes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (ax_time, ax_kl, ax_align) = plt.subplots(1, 3, figsize=(15, 4.2))
    grid = np.linspace(0, minutes, 60)
    for i, label in enumerate(dict.fromkeys(r["label"] for r in results)):
        rows, colour = [r for r in results if r["label"] == label], f"C{i}"
        curves = np.array([np.interp(grid, *r["curve"]) for r in rows])  # (a run's last epoch held to the end)
        mean, se = curves.mean(0), curves.std(0, ddof=1) / np.sqrt(len(rows)) if len(rows) > 1 else 0
        ax_time.plot(grid, mean, color=colour, label=label)
        ax_time.fill_between(grid, mean - se, mean + se, color=colour, alpha=0.25)
        for ax, key in ((ax_kl, "kl"), (ax_align, "alignment_change")):
            x = [(-1 if key == "alignment_change" else 1) * r[key][0] for r in rows]
            ax.scatter(x, [r["area_gain"][0] for r in rows], color=colour, alpha=0.5, s=18)
            ax.errorbar(np.mean(x), np.mean([r["area_gain"][0] for r in rows]), fmt="o", color=colour, ms=8,
                        xerr=mean_se(x)[1] if len(rows) > 1 else None, label=label,
                        yerr=mean_se([r["area_gain"][0] for r in rows])[1] if len(rows) > 1 else None)
    ax_time.set(xlabel="minutes of training", ylabel="area % of the epoch's samples",
                title="objective while training (mean +- s.e. over seeds)")
    ax_kl.set(xlabel="KL(p_theta || p_ref) per trajectory, nats", ylabel="area gained, % (held-apart noise)",
              title="objective gained against KL spent")
    ax_align.set(xlabel="alignment lost (shapes_alignment x 100)", ylabel="area gained, %",
                 title="objective gained against alignment lost")
    for ax in (ax_time, ax_kl, ax_align):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    bookkeeping.atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=90))
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-clock training budget of every run")
    parser.add_argument("--eval-images", type=int, default=EVAL_IMAGES_PER_PROMPT, help="held-apart images a prompt")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--replot", action="store_true", help="only redraw the table and figure from compare.json")
    parser.add_argument("--continue", dest="go_on", action="store_true",
                        help="keep the runs compare.json in --results holds and run only the others (an interrupted "
                             "benchmark goes on where it stopped)")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    opts, script_flags = parser.parse_args(argv[:split]), argv[split + 1:]
    os.makedirs(opts.results, exist_ok=True)
    results, before_cache, raw = [], {}, os.path.join(opts.results, "compare.json")
    if opts.replot and not os.path.isfile(raw):
        parser.error(f"--replot: there is no {raw} to redraw.")
    if opts.replot or opts.go_on and os.path.isfile(raw):  # (--continue with nothing to continue starts afresh)
        with open(raw) as f:
            results = json.load(f)
        opts.minutes = results[0]["budget"]
        opts.settings = [] if opts.replot else opts.settings
    with tempfile.TemporaryDirectory() as workdir:
        for label in opts.settings:
            for seed in opts.seeds:
                if any(r["label"] == label and r["seed"] == seed for r in results):
                    continue
                result, before_images, after_images, prompts = run(label, seed, opts.minutes, script_flags, workdir,
                                                                   opts.eval_images, before_cache)
                results.append(result)
                bookkeeping.write_json(raw, results)  # after every run: an interrupted benchmark keeps its runs
                print(table([result], opts.minutes).splitlines()[2], flush=True)
                if seed == opts.seeds[0]:
                    captions = [p.replace("a ", "", 1) for p in prompts]
                    for name, images in (("before", before_images), (f"{label}_after", after_images)):
                        bookkeeping.save_grid(images, captions, os.path.join(opts.results, f"compare_{name}.png"),
                                              columns=6, scale=4)
    text = table(results, opts.minutes) + (f"\nflags given to the scripts: {' '.join(script_flags)}" if script_flags
                                           else "")
    print("\n" + text)
    bookkeeping.atomic_write(os.path.join(opts.results, "compare.txt"), lambda p: open(p, "w").write(text + "\n"))
    plot(results, opts.minutes, os.path.join(opts.results, "compare.png"))
    return results


if __name__ == "__main__":
    main()
