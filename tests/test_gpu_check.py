"""benchmarks/gpu_check.py, the command to run when a GPU is lent, in its reduced mode on the CPU: every part of it
runs and writes its tables, so that it is known to work before a GPU is there."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # four one-epoch runs, each its own process, and the drift checks (and more) in one more
def test_the_reduced_gpu_check_runs_every_part_and_writes_json_and_markdown(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--reduced",
                           "--results", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_reduced.json").read_text())
    assert [r["label"] for r in report["epochs"]] == ["ddpo.py", "ddpo.py +checkpointing", "d3po.py", "prdp.py"]
    for row in report["epochs"]:
        assert row["epoch_s"] > 0 and row["trajectories_per_s"] > 0 and row["peak_rss_gib"] > 0
    drift = {d["precision"]: d for d in report["drift"]}
    assert set(drift) == {"no", "bf16"} and all("error" not in d for d in drift.values()), drift
    assert drift["no"]["max_abs_log_ratio"] < 1e-4  # float32 on the CPU: the recomputed log-probs are the stored ones
    assert drift["bf16"]["max_abs_log_ratio"] < 1  # finite; its size is what a GPU run reports
    assert report["syncs"] == {"kind": "syncs", "steps": 2, "cuda": False, "sites": []}, report["syncs"]  # ran
    text = (tmp_path / "gpu_check_reduced.md").read_text()
    assert "trajectories/s" in text and "within DDPO clip range" in text and report["versions"]["torch"] in text
    assert "not counted: no CUDA here" in text
    rates = report["flops"]  # benchmarks/flops.py's measure, whose counts test_scale.py checks
    assert "error" not in rates and [p["pass"] for p in rates["passes"]] == ["sampling forward", "training pass"]
    assert all(p["flop"] > 0 and p["seconds"] > 0 for p in rates["passes"]) and rates["matmul_flop_per_s"] > 0
    assert "against a matmul's rate" in text and "sampling forward" in text


def test_a_drift_check_that_fails_is_reported_and_the_next_one_still_runs(tmp_path, capsys):
    import gpu_check  # benchmarks/ is on the path (conftest.py)
    jobs = [dict(model=str(tmp_path / "no-such-model"), device="cpu", precision=p, steps=2, resolution=32)
            for p in ("fp16", "bf16")]
    gpu_check.child(jobs)
    results = [json.loads(line[len("RESULT "):]) for line in capsys.readouterr().out.splitlines()]
    assert [r["precision"] for r in results] == ["fp16", "bf16"] and all(r["error"] for r in results), results


def test_syncs_are_counted_each_time_at_the_projects_line_and_other_warnings_pass():
    """count_syncs stands for torch's sync warnings (CUDA only) with warnings of the same text, raised here."""
    import warnings

    import gpu_check

    library = {}  # a library's function that syncs, as if installed in a virtual environment inside the project
    exec(compile(f"import warnings\ndef index():\n    warnings.warn({gpu_check.SYNC!r})\n",
                 os.path.join(ROOT, ".venv", "lib", "site-packages", "library.py"), "exec"), library)

    def training_call():
        warnings.warn(gpu_check.SYNC)  # once a call
        library["index"]()  # the library's sync, counted at this line
        warnings.warn("something else")

    def epoch():
        for _ in range(3):
            training_call()
        warnings.warn(gpu_check.SYNC + ".")  # once an epoch
    with pytest.warns(UserWarning, match="something else") as shown:
        warnings.simplefilter("default")  # Python's own: a warning once a line; the count must see every one
        sites = gpu_check.count_syncs(epoch)
    here = os.path.relpath(__file__, ROOT)
    assert [(site.split(":")[0], site.split(" ", 1)[1], n) for site, n in sites] == [
        (here, "warnings.warn(gpu_check.SYNC)  # once a call", 3),
        (here, 'library["index"]()  # the library\'s sync, counted at this line', 3),
        (here, 'warnings.warn(gpu_check.SYNC + ".")  # once an epoch', 1)], sites
    assert [str(w.message) for w in shown] == ["something else"] * 3  # shown as usual, each time; no sync among them
