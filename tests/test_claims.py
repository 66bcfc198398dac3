"""benchmarks/claims.py's own arithmetic: its verdicts on hand-made figures (its diversity measure is evaluate.py's,
tested in test_evaluate.py); the runs themselves take hours: docs/claims.md."""
import pytest

import claims


def runs(label, values, key="area_gain", **other):
    return [{"label": label, "seed": s, key: v, **other} for s, v in enumerate(values)]


@pytest.mark.parametrize("ddpo, sf, verdict", [([6, 7, 8], [2, 3, 4], "reproduced"),
                                               ([2, 3, 4], [6, 7, 8], "not reproduced"),
                                               ([5, 7, 9], [4, 6, 8], "not resolved")])
def test_is_against_sf_is_judged_by_two_standard_errors_of_the_difference(ddpo, sf, verdict):
    results = runs("ddpo", ddpo) + runs("ddpo-sf", sf)
    assert claims.judge_is_vs_sf(results)[0] == verdict


def test_the_beta_frontier_needs_gain_and_kl_to_fall_as_beta_grows():
    falling = [r for i, label in enumerate(claims.BETAS) for r in runs(label, [10 - i, 10 - i, 10 - i], kl=100 - i)]
    assert claims.judge_beta(falling)[0] == "reproduced"
    for r in falling:
        r["kl"] = 50 + (r["label"] == claims.BETAS[-1]) * 60  # the largest beta spends the most KL
    assert claims.judge_beta(falling)[0] == "partly"


def test_the_large_scale_claim_needs_ddpo_below_the_base_model_and_prdp_above_it():
    def results(ddpo, prdp):
        return (runs("ddpo-sf-batch-baseline", ddpo, alignment_change=-1.0) + runs("prdp-k1", prdp, alignment_change=0.0)
                + runs("ddpo-sf", [5, 6, 7]))
    assert claims.judge_large_scale(results([-3, -2, -4], [5, 6, 4]))[0] == "reproduced"
    assert claims.judge_large_scale(results([1, 2, 1.5], [5, 6, 4]))[0] == "partly"  # worse, not below the base
    assert claims.judge_large_scale(results([5, 6, 4], [1, 2, 1.5]))[0] == "not reproduced"
    assert "+5.0 +- 0.6" in claims.judge_large_scale(results([5, 6, 4], [1, 2, 1.5]))[2]


def test_d3po_reaches_a_fraction_of_ddpos_gain():
    results = runs("d3po", [4, 4, 4], kl=1.0) + runs("ddpo", [8, 8, 8], kl=1.0) + runs("ddpo-sf", [9, 9, 9], kl=1.0)
    verdict, why, _ = claims.judge_d3po_vs_ddpo(results)
    assert verdict == "partly" and "50%" in why


def test_every_claims_settings_are_known_and_the_list_prints(capsys):
    for claim in claims.CLAIMS.values():
        assert set(claim["settings"]) <= set(claims.SETTINGS)
    claims.main(["--list"])
    assert "ddpo-is-vs-sf" in capsys.readouterr().out


def test_each_row_of_docs_claims_is_what_its_command_prints_from_the_saved_runs():
    """docs/claims.md's measured rows are claims.markdown_row over benchmarks/results/claims.json, to the character."""
    import json
    import os
    from conftest import ROOT
    with open(os.path.join(ROOT, "benchmarks", "results", "claims.json")) as f:
        results = json.load(f)
    with open(os.path.join(ROOT, "docs", "claims.md")) as f:
        table = [line for line in f.read().splitlines() if line.startswith("| ") and "--only " in line]
    measured = 0
    for name, claim in claims.CLAIMS.items():
        row = next(line for line in table if f"--only {name}`" in line)
        mine = [r for r in results if r["label"] in claim["settings"] and r["epochs"] == claim["epochs"]]
        if {r["label"] for r in mine} == set(claim["settings"]):
            assert row == claims.markdown_row(name, mine), name
            measured += 1
        else:
            assert "not run yet" in row, name
    assert measured >= 3
