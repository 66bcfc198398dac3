"""benchmarks/gpu_check.py, the command to run when a GPU is lent, in its reduced mode on the CPU: every part of it
runs and writes its tables, so that it is known to work before a GPU is there."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # four one-epoch runs, each its own process, and the drift checks in one more
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
    text = (tmp_path / "gpu_check_reduced.md").read_text()
    assert "trajectories/s" in text and "within DDPO clip range" in text and report["versions"]["torch"] in text


def test_a_drift_check_that_fails_is_reported_and_the_next_one_still_runs(tmp_path, capsys):
    import gpu_check  # benchmarks/ is on the path (conftest.py)
    jobs = [dict(model=str(tmp_path / "no-such-model"), device="cpu", precision=p, steps=2, resolution=32)
            for p in ("fp16", "bf16")]
    gpu_check.child(jobs)
    results = [json.loads(line[len("RESULT "):]) for line in capsys.readouterr().out.splitlines()]
    assert [r["precision"] for r in results] == ["fp16", "bf16"] and all(r["error"] for r in results), results
