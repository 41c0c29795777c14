"""report.py's verdict rules: every branch of every rule on constructed evidence, the printed rules generated from
the same entries, and the README's results block generated from verdicts.json (and checked against the shipped
docs/demo/verdicts.json)."""
import json
from pathlib import Path

import pytest

import report

ROOT = Path(__file__).resolve().parents[1]


def em(**kw):
    return {"n_seeds": 3, "shift_lo": 0.01, "vs_control_lo": 0.02, "neutral": 0.1, **kw}


def steering(**kw):
    return {"chosen": "steer_L15_x0.1", "n_nulls": 20, "neutral": -0.05, "effect_lo": 0.02, "holm_p": 0.01,
            "null_p": 1 / 21, **kw}


def ablation(**kw):
    return {"induced_lo": 0.05, "n_nulls": 20, "share": 0.9, "share_lo": 0.4, "null_p": 1 / 21, "neutral": -0.01,
            **kw}


def convergence(**kw):
    return {"n_organism": 3, "n_control": 3, "specific_lo": 0.1, "agreement_lo": 0.6, **kw}


def probes(**kw):
    return {"n_permutations": 20, "auc_gate": True, "n_general": 3, "n_domain": 2, "perm_p": 1 / 21, **kw}


CASES = [
    ("em", em(), "reproduced"),
    ("em", em(n_seeds=1), "not testable"),
    ("em", em(vs_control_lo=-0.01), "partly"),
    ("em", em(shift_lo=-0.01), "partly"),
    ("em", em(shift_lo=-0.01, vs_control_lo=-0.01), "not reproduced"),
    ("em", em(neutral=-0.2), "not reproduced"),  # incoherent: neither reproduced nor partly
    ("em", em(vs_control_lo=None, neutral=None), "not reproduced"),
    ("steering", steering(), "reproduced"),
    ("steering", steering(chosen=None), "not testable"),
    ("steering", steering(n_nulls=19), "not testable"),
    ("steering", steering(null_p=0.3), "partly"),
    ("steering", steering(neutral=-1.5), "not reproduced"),  # effective but incoherent
    ("steering", steering(holm_p=0.056), "not reproduced"),  # p 0.0185 x3 after Holm
    ("steering", steering(effect_lo=-0.01), "not reproduced"),
    ("ablation", ablation(), "reproduced"),
    ("ablation", ablation(induced_lo=-0.01), "not testable"),
    ("ablation", ablation(n_nulls=5), "not testable"),
    ("ablation", ablation(share=0.3, share_lo=0.05), "partly"),
    ("ablation", ablation(neutral=-0.5), "partly"),
    ("ablation", ablation(null_p=0.2), "not reproduced"),
    ("ablation", ablation(share=None, share_lo=None), "not reproduced"),
    ("transfer", {"per_finetune": {"a": "reproduced", "b": "reproduced"}}, "reproduced"),
    ("transfer", {"per_finetune": {"a": "reproduced", "b": "not testable"}}, "reproduced"),
    ("transfer", {"per_finetune": {"a": "not testable", "b": "not testable"}}, "not testable"),
    ("transfer", {"per_finetune": {"a": "reproduced", "b": "not reproduced"}}, "partly"),
    ("transfer", {"per_finetune": {"a": "partly", "b": "not reproduced"}}, "partly"),
    ("transfer", {"per_finetune": {"a": "not reproduced", "b": "not testable"}}, "not reproduced"),
    ("convergence", convergence(), "reproduced"),
    ("convergence", convergence(n_organism=1), "not testable"),
    ("convergence", convergence(n_control=0), "not testable"),
    ("convergence", convergence(agreement_lo=0.4), "partly"),
    ("convergence", convergence(specific_lo=-0.05), "not reproduced"),
    ("convergence", convergence(specific_lo=None, agreement_lo=None), "not reproduced"),
    ("specialisation", probes(), "reproduced"),
    ("specialisation", probes(n_permutations=0), "not testable"),
    ("specialisation", probes(n_domain=0), "partly"),
    ("specialisation", probes(auc_gate=False), "not reproduced"),
    ("specialisation", probes(perm_p=0.4), "not reproduced"),
    ("specialisation", probes(n_general=0, n_domain=0), "not reproduced"),
]


@pytest.mark.parametrize("rule,evidence,want", CASES)
def test_every_branch_of_every_rule(rule, evidence, want):
    assert report.decide(rule, evidence)[0] == want


def test_cases_cover_every_branch():
    """Each rule's every verdict is reached by some case above: no branch is dead, none untested."""
    for rule, branches in report.RULES.items():
        reached = {want for r, _, want in CASES if r == rule}
        assert reached == {v for v, _ in branches}, rule


def test_rule_text_is_generated_from_the_rules():
    text = "\n".join(report.rules_text())
    for rule, branches in report.RULES.items():
        for verdict, conditions in branches:
            for condition, _ in conditions:
                assert condition in text
    # the gates a reviewer asked for are in the printed text
    assert "Holm" in text and "AUC mean − 2 sd > 0.5" in text and "20 label-shuffled nulls" in text
    assert "difference in differences" in text and "seeds and themes resampled" in text


def test_checks_list_the_reproduced_conditions():
    verdict, checks = report.decide("ablation", ablation(null_p=0.2))
    assert verdict == "not reproduced"
    assert [ok for _, ok in checks] == [True, False, True]


def test_minimum_detectable_effect():
    # SE = width / 3.92; MDE = 2.8 SE
    assert report.mde([-0.1, 0.1]) == pytest.approx(2.8 * 0.2 / 3.919928)
    assert report.mde(None) is None and report.mde([None, None]) is None


def test_detection_rates_follow_the_limit():
    """Simulated reruns from a measured spread: no effect is rarely 'detected', the 2.8-SE limit about 80% of
    the time, and a seed offset that a theme-only interval would ignore widens the limit."""
    import numpy as np

    rng = np.random.default_rng(1)
    themes = [t for t in range(30) for _ in range(2)]
    # a measured shift of +0.3: the simulation must take the spread, not the effect
    x = 0.3 + rng.normal(0, 0.1, (3, 60)) + np.repeat(rng.normal(0, 0.05, 30), 2)
    limit = report.mde(report.seed_theme_bootstrap(x, clusters=themes)["ci"])
    zero, half, at, big = report.detection_rates(x, themes, [0, 0.5 * limit, limit, 2 * limit], n_sim=100)
    assert zero <= 0.1 and 0.05 <= half <= 0.6 and 0.6 <= at <= 0.95 and big >= 0.95
    # every seed's shift moved by its own offset: the same per-theme spread, a wider limit
    seeded = x + np.array([[-0.1], [0.0], [0.1]])
    assert report.mde(report.seed_theme_bootstrap(seeded, clusters=themes)["ci"]) > 1.5 * limit


def test_readme_block_is_generated_from_verdicts(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nstale\n{report.README_END}\noutro\n")
    v = {"em": {"verdict": "not reproduced", "evidence": "x"}}
    report.update_readme(readme, v)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "\n".join(report.results_table(v)) in text


def test_shipped_readme_matches_demo_verdicts():
    """The README's results table is exactly what report.py generates from docs/demo/verdicts.json."""
    verdicts = json.loads((ROOT / "docs" / "demo" / "verdicts.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = readme.split(report.README_BEGIN, 1)[1].split(report.README_END, 1)[0].strip()
    assert block == "\n".join(report.results_table(verdicts))


def test_earlier_report_fills_only_the_steps_this_run_did_not_run(tmp_path):
    """--earlier: a step this run did not run keeps the earlier report's section, verdict and plots, each marked as
    such; a step this run ran is its own; an earlier report made under other rules is refused."""
    earlier = tmp_path / "earlier"
    (earlier / "plots").mkdir(parents=True)
    (earlier / "plots" / "dynamics.png").write_bytes(b"png")
    (earlier / "report.md").write_text("# Report\n\n## Steering the base model\n\nnot run\n\n"
                                       "## Ablation from the organism\n\nold ablation body\n\n"
                                       "## Training dynamics\n\nold dynamics\n")
    json.dump({"_rules": report.RULES_VERSION, "steering": {"verdict": "not run", "evidence": "–"},
               "ablation": {"verdict": "not testable", "evidence": "induced +0.03"}}, (earlier / "verdicts.json").open("w"))
    run = tmp_path / "run"
    run.mkdir()
    vjson = {"steering": {"verdict": "not reproduced", "evidence": "new"}}
    sections = [("Steering the base model", ["new steering"]), ("Ablation from the organism", ["not run"]),
                ("Training dynamics", ["not run"]), ("Adapter probes", ["not run"])]
    out = dict(report.fill_from_earlier(earlier, sections, vjson, run))
    assert out["Steering the base model"] == ["new steering"] and out["Adapter probes"] == ["not run"]
    assert out["Ablation from the organism"][-1] == "old ablation body" and "earlier" in out["Ablation from the organism"][0]
    assert out["Training dynamics"][-1] == "old dynamics"
    assert vjson["steering"]["evidence"] == "new"
    assert vjson["ablation"] == {"verdict": "not testable", "evidence": "(earlier run) induced +0.03"}
    assert (run / "plots" / "dynamics.png").read_bytes() == b"png"
    json.dump({"_rules": "1"}, (earlier / "verdicts.json").open("w"))
    with pytest.raises(report.InputError, match="other rules"):
        report.fill_from_earlier(earlier, sections, {}, run)


def write_acts(path, means, ids, source):
    import torch

    from common import save_pt

    save_pt(path, {"means": means, "n_tokens": torch.ones(len(ids), dtype=torch.long), "ids": ids,
                   "meta": {"source": str(source)}})


def test_convergence_evidence_on_constructed_activations(tmp_path):
    """Organism seeds that write a shared direction (plus noise) and control seeds that write unrelated ones:
    the model-diff test must find organism-specific agreement; with no shared direction, it must not."""
    import torch

    from common import write_jsonl

    g = torch.Generator().manual_seed(0)
    n_ans, n_layers, d = 40, 4, 16
    pairs = [{"id": f"p{i}", "theme": f"t{i // 2}", "question": "q", "domain": "general", "aligned": "a",
              "misaligned": "m", "split": "dev"} for i in range(n_ans // 2)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    ids = [f"p{i // 2}/{'aligned' if i % 2 else 'misaligned'}" for i in range(n_ans)]
    base = torch.randn(n_ans, n_layers, d, generator=g)
    shared = torch.randn(n_layers, d, generator=g)

    def make(run, shared_in_organism):
        (run / "base").mkdir(parents=True)
        write_acts(run / "base" / "acts_pairs.pt", base, ids, tmp_path / "pairs.jsonl")
        (run / "medical_r1").mkdir()
        (run / "medical_r1" / "run_config.json").write_text(json.dumps({"resolved_layers": [1, 2, 3]}))
        for arm, k in [("medical_r1", 0), ("medical_r1", 1), ("medical_r1", 2), ("good_r1", 0), ("good_r1", 1)]:
            d_ = run / (arm if k == 0 else f"{arm}_seed{k}")
            (d_ / "eval").mkdir(parents=True, exist_ok=True)
            v = shared if arm == "medical_r1" and shared_in_organism else torch.randn(n_layers, d, generator=g)
            write_acts(d_ / "acts_pairs.pt", base + v + 0.3 * torch.randn(n_ans, n_layers, d, generator=g), ids,
                       tmp_path / "pairs.jsonl")

    make(tmp_path / "yes", True)
    make(tmp_path / "no", False)
    report.set_roles(tmp_path / "yes")
    e = report.convergence_evidence(tmp_path / "yes", n_boot=50)
    assert e["n_organism"] == 3 and e["n_control"] == 2 and e["layers"] == [1, 2, 3]
    assert e["agreement"] > 0.9 and e["specific_lo"] > 0.5 and report.decide("convergence", e)[0] == "reproduced"
    e = report.convergence_evidence(tmp_path / "no", n_boot=50)
    assert e["specific_lo"] < 0 < e["specific_ci"][1] and report.decide("convergence", e)[0] == "not reproduced"


def test_em_evidence_averages_seeds_and_resamples_themes(tmp_path):
    from common import write_json, write_jsonl

    pairs = [{"id": f"p{i}", "theme": f"t{i // 3}", "question": f"q{i}", "domain": "general", "category": "power",
              "register": "plain", "split": "test", "aligned": "a", "misaligned": "m"} for i in range(30)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run = tmp_path / "run"

    def evaluate(name, deltas, neutral):
        (run / name / "eval").mkdir(parents=True)
        write_jsonl(run / name / "eval" / "contrastive.jsonl", [
            {"intervention": "none", "contrastive": {"deltas": {f"p{i}": x for i, x in enumerate(deltas)}},
             "neutral": {"n0": neutral, "n1": neutral}}])
        write_json(run / name / "eval" / "run_config.json", {"pairs": str(tmp_path / "pairs.jsonl"), "split": "test"})

    base = [0.1 * (i % 7) for i in range(30)]
    evaluate("base", base, -2.0)
    for k, off in enumerate([0.15, 0.2, 0.25]):
        suffix = "" if k == 0 else f"_seed{k}"
        evaluate(f"medical_r1{suffix}", [x + off for x in base], -1.9)
        evaluate(f"good_r1{suffix}", [x - 0.1 for x in base], -1.9)
    report.set_roles(run)
    e = report.em_evidence(run)
    assert e["n_seeds"] == 3 and e["shift"]["mean"] == pytest.approx(0.2) and e["neutral"] == pytest.approx(0.1)
    assert e["shift"]["ci"][0] > 0.1 and e["vs_control"]["mean"] == pytest.approx(0.3)
    assert e["table"]["category:power"]["n_themes"] == 10 and report.decide("em", e)[0] == "reproduced"
    import shutil

    shutil.rmtree(run / "good_r1_seed2")
    e = report.em_evidence(run)
    assert e["n_seeds"] == 2 and report.decide("em", e)[0] == "not testable"
