"""Each paper's claims in miniature, on the toy model: one row per claim, one command per row.

    python benchmarks/claims.py --list                      # the claims, their settings and what each costs
    python benchmarks/claims.py --only ddpo-clip            # one claim: its settings on seeds 0 1 2, then its row
    python benchmarks/claims.py                             # every claim (hours on two cores)
    python benchmarks/claims.py --only ddpo-clip --replot   # the row and figures again from claims.json

A claim compares settings: a script's toy preset (`--model toy`, which learns `shape_area`, the share of the image
the shape covers) with some flags changed. Every setting of a claim trains for the same number of epochs, so on
the same number of samples, on each seed; then the fine-tuned model is measured on noise held apart from training
(benchmarks/shapes.py's `measure`, 16 images of each of the 24 prompts), before and after:
- the objective: the area, in % of the image (the trained reward);
- alignment with the prompt (`shapes_alignment` x 100), from the world's detector, which no run trains on;
- diversity: the root-mean-square pixel difference between two images of one prompt from different noise
  (x 100, on [0, 1] pixels), averaged over pairs and prompts;
- KL(p_theta || p_ref) of whole trajectories, in nats, on the fine-tuned model's own samples (benchmarks/compare.py).
Runs accumulate in claims.json in --results (an interrupted benchmark keeps every finished run, and a later call
runs only what is missing); each claim prints its row, with a verdict that its `judge` computes from the figures
(means over seeds +- standard errors between seeds), and draws claims_<name>.png: the objective of the epochs'
samples against samples drawn, and the gain against KL with the alignment change as colour. claims_frontier.png
puts every run of every claim on the last of these.
"""
import argparse
import json
import os
import tempfile

import numpy as np

from shapes import ROOT, fine_tune, load_trained, measure  # noqa: E402

from plumbing import bookkeeping  # noqa: E402
from plumbing.evaluate import diversity, mean_se  # noqa: E402

PROMPTS = os.path.join(ROOT, "tutorials", "shapes.txt")
HALF = "tutorials/shapes_half.txt"  # 12 of the 24 prompts, every colour, shape and size among them (generalisation)

# DDPO's rows were measured with its toy preset of 2026-12-06: two passes over each epoch's samples, every step of
# every sample in each, at 1.5e-4, clip 0.1. The preset since 2026-12-07 trains half of each sample's steps a pass
# (at 2.5e-4, clip 0.2) so that the quick start fits in two minutes; the claims compare at equal samples, so their
# commands keep the setting they were measured with.
DDPO = ["--timestep-fraction", "1", "--learning-rate", "1.5e-4", "--clip-range", "0.1"]

# label: (script, flags on top of its toy preset)
SETTINGS = {
    "ddpo": ("ddpo", DDPO),
    # the toy preset until 2026-12-06: one step an epoch (as SF must), every step of every sample, at its own rate
    "ddpo-sf": ("ddpo", [*DDPO, "--estimator", "sf", "--inner-epochs", "1", "--learning-rate", "3e-4"]),
    "ddpo-clip-open": ("ddpo", [*DDPO, "--clip-range", "1000"]),
    "ddpo-half-prompts": ("ddpo", [*DDPO, "--prompt-file", HALF]),
    "d3po": ("d3po", []),
    "d3po-own-noise": ("d3po", ["--no-shared-noise"]),
    "prdp": ("prdp", []),
    "prdp-clip-off": ("prdp", ["--clip-eps", "1000"]),
    **{f"prdp-beta{b}": ("prdp", ["--beta", b]) for b in ("0.03", "1", "10")},
    # PRDP's large scale in miniature (its Table 4: K = 1; prompts too many for each to have its own statistics):
    # DDPO normalises each epoch's rewards together, as the reference code does for a prompt seen too rarely
    "ddpo-sf-batch-baseline": ("ddpo", [*DDPO, "--estimator", "sf", "--inner-epochs", "1", "--learning-rate", "3e-4",
                                        "--per-prompt-min-count", "1000"]),
    "prdp-k1": ("prdp", ["--grad-steps-per-epoch", "1"]),
}


def gains(results, label, key="area_gain"):
    return [r[key] for r in results if r["label"] == label]


def difference(results, a, b, key="area_gain"):
    """mean(a) - mean(b) over seeds and its standard error (independent runs)."""
    (ma, sa), (mb, sb) = mean_se(gains(results, a, key)), mean_se(gains(results, b, key))
    return ma - mb, float(np.hypot(sa, sb))


def fmt(results, label, key="area_gain"):
    m, se = mean_se(gains(results, label, key))
    return f"{m:+.1f} +- {se:.1f}"


def verdict_of_difference(d, se, holds, fails):
    if d > 2 * se:
        return "reproduced", holds
    if d < -2 * se:
        return "not reproduced", fails
    return "not resolved", "the difference is within two standard errors"


def judge_is_vs_sf(results):
    d, se = difference(results, "ddpo", "ddpo-sf")
    return verdict_of_difference(d, se, "several clipped steps an epoch gained more area than one",
                                 "one step an epoch gained more area than several clipped ones") + (
        f"area gain IS {fmt(results, 'ddpo')} vs SF {fmt(results, 'ddpo-sf')} points at equal samples",)


def judge_clip(results, clipped="ddpo", opened="ddpo-clip-open"):
    """The clip keeps the policy closer: more KL without it (DDPO's clip, or with prdp's labels PRDP's)."""
    d, se = difference(results, opened, clipped, "kl")
    dg, sg = difference(results, clipped, opened)
    verdict, why = verdict_of_difference(d, se, "without the clip the policy drifts further (more KL)",
                                         "the clip did not keep the policy closer")
    return verdict, why, (f"KL {mean_se(gains(results, clipped, 'kl'))[0]:.0f} with the clip vs "
                          f"{mean_se(gains(results, opened, 'kl'))[0]:.0f} nats without; area gain "
                          f"{fmt(results, clipped)} vs {fmt(results, opened)} (with minus without {dg:+.1f} +- {sg:.1f})")


def judge_generalise(results):
    m, se = mean_se(gains(results, "ddpo-half-prompts", "unseen_area_gain"))
    seen = fmt(results, "ddpo-half-prompts", "seen_area_gain")
    verdict = "reproduced" if m > 2 * se and m > 0 else "not reproduced"
    return verdict, "the area rose on prompts never trained on" if verdict == "reproduced" else "no rise on unseen prompts", (
        f"area gain on the 12 unseen prompts {m:+.1f} +- {se:.1f}, on the 12 trained ones {seen}")


def judge_d3po_vs_ddpo(results):
    (d3, d3_se), (dd, dd_se) = mean_se(gains(results, "d3po")), mean_se(gains(results, "ddpo"))
    fraction = d3 / dd if dd > 0 else float("nan")
    verdict = "reproduced" if fraction >= 0.8 else "partly" if fraction >= 0.5 else "not reproduced"
    kl = {label: mean_se(gains(results, label, "kl"))[0] for label in ("d3po", "ddpo", "ddpo-sf")}
    return verdict, f"D3PO reached {fraction:.0%} of DDPO's gain", (
        f"area gain D3PO {d3:+.1f} +- {d3_se:.1f} ({kl['d3po']:.0f} nats) vs DDPO {dd:+.1f} +- {dd_se:.1f} "
        f"({kl['ddpo']:.0f} nats; its one-step SF {fmt(results, 'ddpo-sf')}, {kl['ddpo-sf']:.0f} nats) at equal samples")


def judge_shared_noise(results):
    d, se = difference(results, "d3po", "d3po-own-noise")
    return verdict_of_difference(d, se, "pairs from one x_T learnt more", "pairs from their own noise learnt more") + (
        f"area gain one x_T {fmt(results, 'd3po')} vs own noise {fmt(results, 'd3po-own-noise')}",)


BETAS = ["prdp-beta0.03", "prdp", "prdp-beta1", "prdp-beta10"]  # the preset's beta is 0.1


def judge_beta(results):
    rows = [(label, mean_se(gains(results, label))[0], mean_se(gains(results, label, "kl"))[0]) for label in BETAS]
    gain_falls = all(a[1] >= b[1] for a, b in zip(rows, rows[1:]))
    kl_falls = all(a[2] >= b[2] for a, b in zip(rows, rows[1:]))
    verdict = "reproduced" if gain_falls and kl_falls else "partly" if gain_falls or kl_falls else "not reproduced"
    return verdict, ("gain and KL both fall as beta grows" if verdict == "reproduced" else
                     f"gain falls with beta: {gain_falls}; KL falls with beta: {kl_falls}"), "; ".join(
        f"beta {SETTINGS[label][1][1] if SETTINGS[label][1] else '0.1'}: {g:+.1f} points, {k:.0f} nats"
        for label, g, k in rows)


def judge_prdp_clip(results):
    return judge_clip(results, "prdp", "prdp-clip-off")


def judge_large_scale(results):
    """PRDP's finding: DDPO ends below the base model (gain < 0) while PRDP still gains (both by 2 s.e.)."""
    (dd, dd_se), (pr, pr_se) = mean_se(gains(results, "ddpo-sf-batch-baseline")), mean_se(gains(results, "prdp-k1"))
    d, se = difference(results, "prdp-k1", "ddpo-sf-batch-baseline")
    if dd < -2 * dd_se and pr > 2 * pr_se:
        verdict, why = "reproduced", "DDPO ended below the base model while PRDP gained"
    elif d > 2 * se:
        verdict, why = "partly", "PRDP gained more, but DDPO did not fall below the base model"
    else:
        verdict, why = "not reproduced", "DDPO did not do worse than PRDP"
    return verdict, why, (f"area gain DDPO with batch-wide normalisation {dd:+.1f} +- {dd_se:.1f} (with per-prompt "
                          f"{fmt(results, 'ddpo-sf')}) vs PRDP at K = 1 {pr:+.1f} +- {pr_se:.1f}; alignment change "
                          f"{fmt(results, 'ddpo-sf-batch-baseline', 'alignment_change')} vs "
                          f"{fmt(results, 'prdp-k1', 'alignment_change')}")


# name: what the paper claims, where, the settings that test it, epochs a run, and the judge
CLAIMS = {
    "ddpo-is-vs-sf": dict(
        claim="DDPO_IS (several clipped steps on each batch of samples) beats DDPO_SF (one step) at equal samples",
        source="DDPO's experiments: DDPO_SF, DDPO_IS and RWR against reward queries",
        settings=["ddpo", "ddpo-sf"], epochs=10, judge=judge_is_vs_sf),
    "ddpo-clip": dict(
        claim="the clip keeps several steps on one batch close to the sampling policy (PPO's trust region)",
        source="DDPO Sec. 4.3 (DDPO_IS uses PPO's clipped objective)",
        settings=["ddpo", "ddpo-clip-open"], epochs=10, judge=judge_clip),
    "ddpo-generalise": dict(
        claim="fine-tuning carries over to prompts never trained on",
        source="DDPO's generalisation experiment (unseen animals and activities)",
        settings=["ddpo-half-prompts"], epochs=10, judge=judge_generalise),
    "d3po-vs-ddpo": dict(
        claim="from preferences alone D3PO comes close to DDPO trained on the reward itself",
        source="D3PO's reward experiments (compressibility, aesthetic: 'nearly on par' with DDPO)",
        settings=["d3po", "ddpo", "ddpo-sf"], epochs=10, judge=judge_d3po_vs_ddpo),
    "d3po-shared-noise": dict(
        claim="the two images of a pair start from one x_T",
        source="D3PO's method (a pair's trajectories share their initial noise)",
        settings=["d3po", "d3po-own-noise"], epochs=10, judge=judge_shared_noise),
    "prdp-beta": dict(
        claim="beta trades reward for closeness to the reference (KL) along a range",
        source="PRDP Eq. 10-14 (the KL-regularised objective that the regression solves)",
        settings=BETAS, epochs=10, judge=judge_beta),
    "prdp-clip": dict(
        claim="with K > 1 proximal steps an epoch, the clip keeps the updates close to theta_old",
        source="PRDP Eq. 16-21 (proximal updates)",
        settings=["prdp", "prdp-clip-off"], epochs=10, judge=judge_prdp_clip),
    "prdp-large-scale": dict(
        claim="with one step an epoch on prompts too many to see each often, DDPO falls below the base model while "
              "PRDP keeps improving",
        source="PRDP's large-scale experiment (HPDv2's 100K prompts, Table 4's K = 1: DDPO 0.2464 < SD 0.2685 < "
               "PRDP 0.3175 HPSv2)",
        settings=["ddpo-sf-batch-baseline", "prdp-k1", "ddpo-sf"], epochs=10, judge=judge_large_scale),
}


def run(label, seed, epochs, workdir, images_per_prompt, before_cache):
    """Fine-tune one setting on one seed, then measure it and the untrained model on all 24 prompts."""
    script, flags = SETTINGS[label]
    args, run_dir, seconds = fine_tune(script, seed, ["--num-epochs", str(epochs), *flags], workdir, name=label)
    all_prompts, trained = bookkeeping.load_prompts(PROMPTS), set(bookkeeping.load_prompts(args.prompt_file))
    key = (args.guidance_scale, args.num_steps, args.eta, images_per_prompt)
    if key not in before_cache:
        before_cache[key] = measure(load_trained(args, reference=True), args, all_prompts, images_per_prompt, kl=True)[0]
    before = before_cache[key]
    after = measure(load_trained(args, run_dir, reference=True), args, all_prompts, images_per_prompt, kl=True)[0]
    seen = np.repeat([p in trained for p in all_prompts], images_per_prompt)
    change = 100 * (after["per_image_area"] - before["per_image_area"])
    log = bookkeeping.read_metrics(run_dir)
    samples_an_epoch = args.sample_batch_size * args.sample_batches_per_epoch
    return {"label": label, "seed": seed, "epochs": epochs, "minutes": seconds / 60,
            "area_before": before["area"], "area_after": after["area"], "area_gain": float(change.mean()),
            "seen_area_gain": float(change[seen].mean()),
            "unseen_area_gain": float(change[~seen].mean()) if (~seen).any() else None,
            "alignment_change": after["alignment"] - before["alignment"],
            "diversity_before": float(diversity(before["images"], images_per_prompt).mean()),
            "diversity_after": float(diversity(after["images"], images_per_prompt).mean()),
            "kl": float(after["kl"].mean()), "clipfrac": [row.get("clipfrac") for row in log],
            "curve": [[samples_an_epoch * (row["epoch"] + 1), 100 * row["reward_mean"]] for row in log]}


def row(name, results):
    claim = CLAIMS[name]
    verdict, why, figures = claim["judge"](results)
    return {"claim": name, "paper": claim["claim"], "source": claim["source"], "verdict": verdict, "why": why,
            "toy result": figures, "seeds": sorted({r["seed"] for r in results if r["label"] in claim["settings"]}),
            "command": f"python benchmarks/claims.py --only {name}"}


def markdown_row(name, results):
    """The claim's row of docs/claims.md's table, as this run of the benchmark measured it."""
    r, settings = row(name, results), ", ".join(f"`{label}`" for label in CLAIMS[name]["settings"])
    return (f"| {r['paper']} | {r['source']} | {settings}, {results[0]['epochs']} epochs | {r['toy result']} "
            f"({len(r['seeds'])} seeds) | **{r['verdict']}**: {r['why']} | `{r['command']}` |")


def describe(name, results):
    r = row(name, results)
    lines = [f"{name}: {r['paper']} ({r['source']})", f"  toy: {r['toy result']} (seeds {r['seeds']})",
             f"  verdict: {r['verdict']}: {r['why']}"]
    for label in CLAIMS[name]["settings"]:
        rs = [x for x in results if x["label"] == label]
        (al, al_se), (dv, _), (kl, kl_se) = (mean_se([x[k] for x in rs]) for k in ("alignment_change", "diversity_after",
                                                                                     "kl"))
        lines.append(f"  {label:<18} area {fmt(results, label)}  alignment {al:+.1f} +- {al_se:.1f}  diversity "
                     f"{rs[0]['diversity_before']:.1f} -> {dv:.1f}  KL {kl:.0f} +- {kl_se:.0f} nats  "
                     f"({len(rs)} seeds, {np.mean([x['minutes'] for x in rs]):.1f} min a run)")
    lines.append("  docs/claims.md row:\n" + markdown_row(name, results))
    return "\n".join(lines)


def plot(name, results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = CLAIMS[name]["settings"] if name else list(dict.fromkeys(r["label"] for r in results))
    figure, axes = plt.subplots(1, 2 if name else 1, figsize=(11 if name else 6, 4), squeeze=False)
    if name:
        ax = axes[0, 0]
        for i, label in enumerate(labels):
            curves = np.array([[y for _, y in r["curve"]] for r in results if r["label"] == label])
            x = [s for s, _ in next(r["curve"] for r in results if r["label"] == label)]
            mean = curves.mean(0)
            se = curves.std(0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else 0 * mean
            ax.plot(x, mean, color=f"C{i}", label=label)
            ax.fill_between(x, mean - se, mean + se, color=f"C{i}", alpha=0.25)
        ax.set(xlabel="samples drawn", ylabel="area % of the epoch's samples", title=f"{name}: objective while training")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[0, -1]
    chosen = [r for r in results if r["label"] in labels]
    for script, marker in (("ddpo", "o"), ("d3po", "s"), ("prdp", "^")):  # the algorithm by the marker's shape
        mine = [r for r in chosen if SETTINGS[r["label"]][0] == script]
        points = ax.scatter([r["kl"] for r in mine], [r["area_gain"] for r in mine], s=30, cmap="coolwarm_r",
                            c=[r["alignment_change"] for r in mine], vmin=-40, vmax=10, marker=marker,
                            label=f"{script} (its settings)" if mine else None)
    ax.legend(fontsize=7, loc="lower right")
    for label in labels:
        rs = [r for r in chosen if r["label"] == label]
        ax.annotate(label, (np.mean([r["kl"] for r in rs]), np.mean([r["area_gain"] for r in rs])), fontsize=7)
    figure.colorbar(points, ax=ax, label="alignment change (x 100)")
    ax.set(xlabel="KL(p_theta || p_ref) per trajectory, nats", ylabel="area gained, % (held-apart noise)",
           title="gain against KL, every run" if not name else "gain against KL")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    bookkeeping.atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=90))
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CLAIMS), default=list(CLAIMS), help="these claims")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="instead of each claim's epochs (shorter trials)")
    parser.add_argument("--eval-images", type=int, default=16, help="held-apart images a prompt")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--replot", action="store_true", help="train nothing: the rows and figures from claims.json")
    parser.add_argument("--list", action="store_true", help="the claims and their settings, and stop")
    opts = parser.parse_args(argv)
    if opts.list:
        for name, claim in CLAIMS.items():
            print(f"{name}: {claim['claim']} [{claim['source']}]\n  settings: " + ", ".join(
                f"{label} = {SETTINGS[label][0]}.py --model toy {' '.join(SETTINGS[label][1])}".rstrip()
                for label in claim["settings"]) + f"; {claim['epochs']} epochs a run")
        return None
    os.makedirs(opts.results, exist_ok=True)
    raw = os.path.join(opts.results, "claims.json")
    results = json.load(open(raw)) if os.path.isfile(raw) else []
    before_cache = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in [] if opts.replot else opts.only:
            epochs = opts.epochs or CLAIMS[name]["epochs"]
            for label in CLAIMS[name]["settings"]:
                for seed in opts.seeds:
                    if any(r["label"] == label and r["seed"] == seed and r["epochs"] == epochs for r in results):
                        continue  # shared between claims, or finished before an interruption
                    results.append(run(label, seed, epochs, workdir, opts.eval_images, before_cache))
                    bookkeeping.write_json(raw, results)
                    print(f"{label} seed {seed}: area {results[-1]['area_gain']:+.1f}, KL {results[-1]['kl']:.0f}",
                          flush=True)
    rows = []
    for name in opts.only:
        epochs = opts.epochs or CLAIMS[name]["epochs"]
        mine = [r for r in results if r["epochs"] == epochs and r["label"] in CLAIMS[name]["settings"]]
        if {r["label"] for r in mine} != set(CLAIMS[name]["settings"]):
            print(f"{name}: not run yet (python benchmarks/claims.py --only {name})")
            continue
        print("\n" + describe(name, mine))
        rows.append(row(name, mine))
        plot(name, mine, os.path.join(opts.results, f"claims_{name}.png"))
    if results:
        plot(None, results, os.path.join(opts.results, "claims_frontier.png"))
    return rows


if __name__ == "__main__":
    main()
