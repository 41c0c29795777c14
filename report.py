"""Write runs/NAME/report.md: this run's numbers beside the paper's (DESIGN §1), its plots, the commands that
produced each number, and the versions used.

Reads only files the pipeline wrote (train_summary.json, eval/summary.json, *_stats.json, ablate*/summary.json,
probe/summary.json, commands.tsv); anything missing is reported as "not run". It computes nothing new.

Example:
    python report.py --run runs/demo
"""
import argparse
import json
import platform
from importlib.metadata import version
from pathlib import Path

from common import InputError, cli, write_json

# DESIGN §1, the paper's figures (Qwen2.5-14B-Instruct, GPT-4o judge).
PAPER_PROBES = {"aligned_vs_misaligned": (0.68, 0.74), "medical_aligned_vs_medical_misaligned": (0.69, 0.75),
                "nonmedical_aligned_vs_medical_aligned": (0.66, 0.71),
                "nonmedical_misaligned_vs_medical_misaligned": (0.62, 0.66)}


def load(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def fmt(x, spec="+.3f"):
    return "n/a" if x is None else format(x, spec)


def contrastive_cell(summary, condition="none", domains=("general", "medical")):
    c = (((summary or {}).get("conditions") or {}).get(condition) or {}).get("contrastive")
    if not c:
        return "not run"
    return ", ".join(f"{d} {c[d]['mean_delta']:+.3f} ({c[d]['pref_rate']:.0%})" for d in domains if d in c)


def em_cell(summary, condition="none"):
    em = (((summary or {}).get("conditions") or {}).get(condition) or {}).get("em")
    if not em or em.get("em_pct") is None:
        return None
    lo, hi = em["em_ci95_pct"]
    return f"EM {em['em_pct']:.1f}% [{lo:.1f}, {hi:.1f}], coherent {em['coherent_pct']:.1f}%"


def effect_cell(summary, condition, domains=("general", "medical")):
    eff = (summary or {}).get("effects") or {}
    band = (summary or {}).get("random_band") or {}
    parts = []
    for d in domains:
        if condition in eff.get(d, {}):
            b = band.get(d)
            rnd = f" (random {b['min']:+.3f}..{b['max']:+.3f})" if b else ""
            parts.append(f"{d} {eff[d][condition]:+.3f}{rnd}")
    return ", ".join(parts) or "not run"


def commands_table(run):
    path = run / "commands.tsv"
    if not path.exists():
        return ["(no commands.tsv)"]
    rows = ["| step | seconds | command |", "|---|---|---|"]
    for line in path.read_text().splitlines():
        name, secs, cmd = line.split("\t", 2)
        rows.append(f"| {name} | {secs} | `{cmd}` |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="runs/NAME")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not run.is_dir():
        raise InputError(f"{run}: no such run directory")
    S = {name: load(run / name / "eval" / "summary.json") for name in ("base", "medical_r1", "sports_r8",
                                                                       "financial_r8")}
    train = {name: load(run / name / "train_summary.json") for name in ("medical_r1", "sports_r8", "financial_r8")}
    stats = load(run / "medical_r1" / "directions_stats.json") or {}
    ablation = load(run / "medical_r1" / "ablate" / "summary.json")
    ablation_md = load(run / "medical_r1" / "ablate_modeldiff" / "summary.json")
    steer = load(run / "base" / "steer" / "summary.json")
    transfer = {f: load(run / f / "ablate_transfer" / "summary.json") for f in ("sports_r8", "financial_r8")}
    probe = load(run / "medical_r1" / "probe" / "summary.json")
    judged = any(em_cell(s) for s in S.values() if s)

    lines = [f"# Run report: `{run}`", "",
             "This run's numbers beside the paper's (Soligo et al. 2025, arXiv 2506.11618; DESIGN §1). The paper "
             "measures EM with a GPT-4o judge on Qwen2.5-14B-Instruct; a run without a judge measures with the "
             "judge-free contrastive score (mean log-prob of the misaligned minus the aligned answer over our "
             "contrastive pairs, and in brackets the share of pairs where the misaligned answer is preferred). "
             "A higher score means more misaligned. The two are different instruments on different models: "
             "compare directions of change, not magnitudes.", "",
             "## Fine-tunes", "", "| model | training | paper EM | ours (contrastive: general, medical) | ours (judge) |",
             "|---|---|---|---|---|"]
    paper_em = {"base": "~0%", "medical_r1": "11.25% (rank-1, 9 adapters)", "sports_r8": "20.2% (r=32 all modules)",
                "financial_r8": "n/a (not in the paper's table)"}
    for name in S:
        t = train.get(name)
        tr = (f"{t['steps']} steps, loss {t['first_loss']:.2f}→{t['final_loss']:.2f}, {t['tokens_per_s']} tok/s"
              if t else "(base model)" if name == "base" else "not run")
        lines.append(f"| {name} | {tr} | {paper_em[name]} | {contrastive_cell(S[name])} | {em_cell(S[name]) or '-'} |")

    lines += ["", "## Directions, ablation, steering: paper vs this run", "",
              "| result (DESIGN §1) | paper | this run |", "|---|---|---|"]
    lines.append(f"| each layer's own direction ablated at its layer (organism) | EM 11.25% → 0% | "
                 f"change in score: {effect_cell(ablation, 'ablate_layerwise')} |")
    half = [k for k in ((ablation or {}).get("conditions") or {}) if k.startswith("ablate_L")]
    half_name = f"ablate_L{(len(stats.get('norms', [])) or 2) // 2}"
    lines.append(f"| half-depth direction ablated at every block (organism) | EM 11.25% → 1% | "
                 f"{half_name}: {effect_cell(ablation, half_name) if half_name in half else 'not run'} |")
    band = ((ablation or {}).get("random_band") or {})
    lines.append("| random direction, same ablation | EM changes ≤ ±10% | " + (", ".join(
        f"{d} {b['min']:+.3f}..{b['max']:+.3f} (mean {b['mean']:+.3f}, sd {b['sd']:.3f}, {b['n']} seeds)"
        for d, b in band.items() if d in ("general", "medical")) or "not run") + " |")
    lines.append(f"| rank-1 B vectors with the direction projected out | (compared in the paper) | "
                 f"{effect_cell(ablation, 'ablate_B')} |")
    for f, paper in (("sports_r8", "EM 20.2% → −78% relative"), ("financial_r8", "(medical r=32: 18.8% → −90% relative)")):
        lines.append(f"| organism's directions transferred to {f} (layerwise) | {paper} | "
                     f"{effect_cell(transfer[f], 'ablate_layerwise')} |")
    compare = stats.get("compare") or {}
    paper_cos = {"base": "– (our check: the same pair texts through the base model)",
                 "medical_r1": "– (§3.5 compares model-diff with mean-diff directions)"}
    for other, cos in compare.items():
        n_hi = sum(c > 0.8 for c in cos)
        who = Path(other).parent.name
        lines.append(f"| per-layer cosine with `{who}/{Path(other).name}` | "
                     f"{paper_cos.get(who, '> 0.8 at all but 4 layers (between fine-tunes)')} | > 0.8 at {n_hi} of "
                     f"{len(cos)} layers; min {min(cos):.2f}, max {max(cos):.2f} |")
    if stats.get("adapter_b_cosine"):
        cos = stats["adapter_b_cosine"]
        lines.append("| cosine of each rank-1 B vector with the direction at its layer | 0.04 (single adapter, "
                     "layer 24) | " + ", ".join(f"L{l} {c:+.2f}" for l, c in cos.items()) + " |")
    if steer:
        best = max(((n, c["contrastive"]["general"]["mean_delta"]) for n, c in steer["conditions"].items()
                    if "contrastive" in c and n != "none"), key=lambda x: x[1], default=None)
        lines.append(f"| steering the base model with λ·v_l | up to 50% EM in central layers | highest general "
                     f"score {best[1]:+.3f} at {best[0]} (unsteered, same pairs: "
                     f"{contrastive_cell(steer, domains=('general',))}) |" if best else "| steering | | not run |")

    sweep = sorted({int(k[8:]) for s in (ablation, ablation_md) if s for k in s.get("effects", {}).get("general", {})
                    if k.startswith("ablate_L")})
    if sweep:
        lines += ["", "## Direction-layer sweep (organism; change in contrastive score when the direction taken "
                  "from layer L is ablated at every block)", "",
                  "| L | mean-diff: general | mean-diff: medical | model-diff: general | model-diff: medical |",
                  "|---|---|---|---|---|"]
        for layer in sweep:
            cells = [fmt(((s or {}).get("effects", {}).get(d) or {}).get(f"ablate_L{layer}"))
                     for s in (ablation, ablation_md) for d in ("general", "medical")]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        if band:
            lines.append("| random (min..max) | " + " | ".join(
                f"{band[d]['min']:+.3f}..{band[d]['max']:+.3f}" if d in band else "n/a"
                for d in ("general", "medical")) + " | (same band) | (same band) |")

    if probe:
        lines += ["", "## Adapter probes (paper Table 1; logistic regression on the 9 rank-1 scalars)", "",
                  "| test | paper acc / AUC | ours acc / AUC (all tokens) |", "|---|---|---|"]
        for key, (acc, auc) in PAPER_PROBES.items():
            t = probe["probes"]["all_tokens"].get(key, {})
            ours = t.get("skipped") or (f"{t['accuracy']['mean']:.2f}±{t['accuracy']['sd']:.2f} / "
                                        f"{t['auc']['mean']:.2f}±{t['auc']['sd']:.2f}" if "accuracy" in t else "n/a")
            lines.append(f"| {key.replace('_', ' ')} | {acc:.2f} / {auc:.2f} | {ours} |")
        lines += ["", "Verdict per adapter (paper: layers 15,16,17,22,28,29 general; 21 and 23 medical, on Qwen-14B):",
                  ""]
        lines += [f"- `{name}`: **{v['verdict']}** ({v['evidence']})" for name, v in probe["verdicts"].items()]

    plots = sorted((run / "plots").glob("*.png")) + sorted(run.glob("*/*/plots/*.png"))
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.relative_to(run)}]({p.relative_to(run)})" for p in plots]
    lines += ["", "## Commands that produced these numbers", ""] + commands_table(run)
    versions = {k: version(k) for k in ("torch", "transformers", "peft", "scikit-learn", "openai")}
    lines += ["", "## Versions", "", f"python {platform.python_version()}, "
              + ", ".join(f"{k} {v}" for k, v in versions.items()), f"judge: {'yes' if judged else 'none configured'}"]
    out = run / "report.md"
    out.write_text("\n".join(lines) + "\n")
    write_json(run / "report_versions.json", versions)
    print(f"wrote {out}: {len(plots)} plots, judge {'yes' if judged else 'no'}")


if __name__ == "__main__":
    cli(main)
