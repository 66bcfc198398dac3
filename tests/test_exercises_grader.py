"""The exercises' grader (tutorials/exercises), graded itself: it gives every point to the reference solutions,
none to the untouched stubs (each check failing on NotImplementedError, not on a crash of the grader), fails every
find-the-bug variant as handed out, and names the mistake in near-miss answers. Run in subprocesses, as a student
or an autograder runs it: `python -m pytest tutorials/exercises --grades grades.json`."""
import json
import re
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

EXERCISES = os.path.join(ROOT, "tutorials", "exercises")


def grade(tmp_path, graded, *paths):
    """Run the grader on `graded` (student, solutions or a folder) and return its JSON summary."""
    out = tmp_path / f"grades-{len(os.listdir(tmp_path))}.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--grades", str(out),
                           *(paths or [EXERCISES])], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "EXERCISES_GRADE": graded})
    assert out.exists(), f"the grader wrote no summary:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
    with open(out) as f:
        return json.load(f), done


def checks(summary):
    return {c["check"]: c for e in summary["exercises"].values() for c in e["checks"]}


def test_the_untouched_stubs_get_no_point_each_check_failing_on_not_implemented_and_every_bug_is_caught(tmp_path):
    summary, done = grade(tmp_path, "student", os.path.join(EXERCISES, "test_exercises.py"),
                          os.path.join(EXERCISES, "test_bugs.py"), os.path.join(EXERCISES, "test_capstone.py"))
    assert done.returncode == 1 and summary["points"] == 0 and summary["out_of"] >= 40
    assert "points (student)" in done.stdout  # the table a student reads
    for name, check in checks(summary).items():
        assert not check["passed"], name
        if name in checks_of(EXERCISES, "test_bugs.py"):
            assert "NotImplementedError" not in check["message"] and check["message"], (name, check["message"])
        else:
            assert check["message"].startswith("NotImplementedError"), (name, check["message"])
    assert len(checks_of(EXERCISES, "test_bugs.py")) == 6


def checks_of(folder, test_file):
    with open(os.path.join(folder, test_file)) as f:
        return [line.split("(")[0][4:] for line in f if line.startswith("def test_")]


@pytest.mark.slow
def test_the_reference_solutions_get_every_point_and_the_capstone_learns(tmp_path):
    summary, done = grade(tmp_path, "solutions")
    assert done.returncode == 0, done.stdout[-3000:]
    assert summary["points"] == summary["out_of"] >= 40
    capstone = checks(summary)["test_your_d3po_loss_raises_the_toy_objective"]
    assert capstone["area_rise"] > 2 * capstone["standard_error"] > 0
    print(f"capstone with the reference D3PO loss: area {capstone['area_rise']:+.1f} +- {capstone['standard_error']}")


# near misses: the reference solution with one thing wrong, and a word the grader's message must contain
NEAR_MISSES = [
    [("ddim_log_prob", "not the sum", """
def ddim_log_prob(prev_sample, mean, std):
    log_density = torch.distributions.Normal(mean, std).log_prob(prev_sample.detach())
    return log_density.sum(dim=(1, 2, 3))
"""), ("per_prompt_advantages", "whole batch", """
def per_prompt_advantages(stats, prompts, rewards, buffer_size, min_count):
    r = torch.as_tensor(rewards, dtype=torch.float64)
    return ((r - r.mean()) / (r.std(unbiased=False) + 1e-6)).float()
"""), ("ddpo_clipped_loss", "pessimistic", """
def ddpo_clipped_loss(log_probs, old_log_probs, advantages, clip_range):
    ratio = torch.exp(log_probs - old_log_probs)
    return torch.minimum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
"""), ("d3po_loss", "no beta", """
def d3po_loss(log_probs, ref_log_probs, beta, ratio_clip):
    return project_d3po_loss(log_probs, ref_log_probs, 1.0, ratio_clip)[0]
"""), ("rdp_loss", "MEAN", """
def rdp_loss(log_ratio, old_log_ratio, rewards, pairs, beta, clip_eps):
    T = log_ratio.shape[1]
    return project_rdp_loss(log_ratio * T, old_log_ratio * T, rewards, pairs, beta, clip_eps * T)[0]
"""), ("ddim_step_mean_std", "multiply by eta", """
_right_step = ddim_step_mean_std
def ddim_step_mean_std(alphas_cumprod, final_alpha_cumprod, step_ratio, model_output, timestep, sample, eta):
    mean, std = _right_step(alphas_cumprod, final_alpha_cumprod, step_ratio, model_output, timestep, sample, eta)
    return mean, std / eta
"""), ("two_pass_backward", "4 calls without a graph", """
def two_pass_backward(step_log_prob, num_steps, loss_fn):
    loss = loss_fn(torch.stack([step_log_prob(s) for s in range(num_steps)], 1))
    loss.backward()
    return loss
""")],
    [("d3po_loss", "swapped", """
def d3po_loss(log_probs, ref_log_probs, beta, ratio_clip):
    return project_d3po_loss(log_probs.flip(1), ref_log_probs.flip(1), beta, ratio_clip)[0]
"""), ("rdp_loss", "no beta", """
def rdp_loss(log_ratio, old_log_ratio, rewards, pairs, beta, clip_eps):
    return project_rdp_loss(log_ratio, old_log_ratio, rewards, pairs, 1.0, clip_eps)[0]
"""), ("ddim_step_mean_std", "deterministic", """
_right_step = ddim_step_mean_std
def ddim_step_mean_std(alphas_cumprod, final_alpha_cumprod, step_ratio, model_output, timestep, sample, eta):
    _, std = _right_step(alphas_cumprod, final_alpha_cumprod, step_ratio, model_output, timestep, sample, eta)
    mean, _ = _right_step(alphas_cumprod, final_alpha_cumprod, step_ratio, model_output, timestep, sample, 1e-12)
    return mean, std
""")],
    [("ddpo_clipped_loss", "summed over the samples", """
def ddpo_clipped_loss(log_probs, old_log_probs, advantages, clip_range):
    ratio = torch.exp(log_probs - old_log_probs)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).sum()
"""), ("rdp_loss", "summed the pairs", """
def rdp_loss(log_ratio, old_log_ratio, rewards, pairs, beta, clip_eps):
    return len(pairs) * project_rdp_loss(log_ratio, old_log_ratio, rewards, pairs, beta, clip_eps)[0]
""")],
]


@pytest.mark.parametrize("group", range(len(NEAR_MISSES)))
def test_a_near_miss_fails_with_a_message_that_points_at_the_mistake(tmp_path, group):
    folder = tmp_path / "near-miss"
    folder.mkdir()
    with open(os.path.join(EXERCISES, "solutions", "exercises.py")) as f:
        source = f.read()
    misses = NEAR_MISSES[group]
    (folder / "exercises.py").write_text(source + "".join(code for _, _, code in misses))
    shutil.copy(os.path.join(EXERCISES, "solutions", "bugs.py"), folder / "bugs.py")
    summary, _ = grade(tmp_path, str(folder), os.path.join(EXERCISES, "test_exercises.py"))
    failed = [c for c in checks(summary).values() if not c["passed"]]
    for function, word, _ in misses:
        assert any(word in c["message"] for c in failed), \
            f"a near miss in {function} was not named ('{word}'): {[c['message'] for c in failed]}"
    passed = {e: v["points"] == v["out_of"] for e, v in summary["exercises"].items()}
    assert not all(passed.values())


def bug_names():
    """The start of each row's "the bug" cell on the instructor's page, up to its first bracket or colon: what
    names the bug (the words the handout must not hold)."""
    with open(os.path.join(EXERCISES, "solutions", "README.md"), encoding="utf-8") as f:
        rows = [line.split("|") for line in f if line.startswith("| `") and line.count("|") == 4]
    names = [re.split(r"[(:]", cells[2])[0].strip() for cells in rows if cells[1].strip("` ") in BUGS]
    assert len(names) == len(BUGS) and all(len(n) > 15 for n in names), names
    return names


BUGS = ("average_gradients", "d3po_step_loss", "save_lora", "normalised_advantages", "reward_metrics", "sampling_step")


def test_the_handout_names_no_bug_and_holds_no_fix_and_the_grader_runs_there(tmp_path):
    """The handout made with the instructor's page's own line: no solutions/, no bug named anywhere in it (the
    instructor's table), no fix's comment, no answer to the stubs' questions, and the grader grades the untouched
    stubs there, the points first."""
    with open(os.path.join(EXERCISES, "solutions", "README.md"), encoding="utf-8") as f:
        recipe = re.search(r"^    (mkdir handout && git archive HEAD .*)$", f.read(), re.M).group(1)
    handout = tmp_path / "handout"
    subprocess.run(recipe.replace("handout", str(handout)), shell=True, cwd=ROOT, check=True)
    assert (handout / "tutorials" / "exercises" / "README.md").exists()
    assert not (handout / "tutorials" / "exercises" / "solutions").exists()
    with open(os.path.join(EXERCISES, "solutions", "bugs.py"), encoding="utf-8") as f:
        fixes = [line.split("# FIX:")[1].strip() for line in f if "# FIX:" in line]
    fixes = [fix for fix in fixes if len(fix) > 20]  # each fix's explanation (one is the single word "mean")
    with open(os.path.join(EXERCISES, "solutions", "README.md"), encoding="utf-8") as f:
        answers = [line.split("|")[3].split(":")[0].strip() for line in f.read().split("## The stubs' questions")[1]
                   .splitlines() if re.match(r"\| \d \|", line)]
    assert len(answers) == 7
    answers = [a for a in answers if len(a) > 20]  # the longer answers: "T of each" is in the project's own tests
    withheld = [name.lower() for name in bug_names()] + [fix.lower() for fix in fixes] + [a.lower() for a in answers]
    texts = [p for p in handout.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".ipynb", ".txt", ".html")]
    assert len(texts) > 50
    for path in texts:
        text = " ".join(path.read_text(encoding="utf-8").lower().split())
        for words in withheld:
            assert words not in text, f"the handout's {path.relative_to(handout)} gives away: {words!r}"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--grades", "g.json",
                           "--student", "s042", "tutorials/exercises/test_exercises.py"], cwd=handout,
                          capture_output=True, text=True, timeout=600)
    summary = json.loads((handout / "g.json").read_text())
    assert summary["student"] == "s042" and summary["points"] == 0 and summary["out_of"] > 0, done.stdout[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    table = next(i for i, line in enumerate(lines) if line.startswith("points (student, student s042):"))
    assert all(re.fullmatch(r"[.FEsx]+(\s+\[\s*\d+%\])?", line) for line in lines[:table]), lines[:table]
    assert "Traceback" not in done.stdout and "def test_" not in done.stdout and "NotImplementedError" in done.stdout
