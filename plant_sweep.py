"""The positive control's direction and strength, chosen on dev by a fixed rule and then frozen (beyond the paper).

`bash run_all.sh --preset planted` plants the base model's own dev-pair direction u as a rank-1 adapter
(plant_organism.py; docs/method.md#positive-control): (a) at one block, (c) two blocks later. For the ablation and
transfer rules to be able to read "reproduced" there, two things must hold, and both belong to the model, not to
the pipeline:
- the base model survives losing u: projected out of every block (the ablation every verdict uses), u costs at
  most 0.15 nats/token of neutral text, the ablation rule's coherence clause applied to the base alone;
- the plants move the score enough for the preset's test subset (16 general pairs) to see them.
This script measures both on dev only, and picks the direction and the strength by a fixed rule (version 3,
below; versions 1 and 2 are said after it):
1. **Direction.** Candidates: the dev-pair directions of blocks 1..n-3 that are not degenerate. Cost: the base
   model's mean neutral log-prob change on the dev neutral answers (items 56-75 of data/eval/neutral.jsonl, the
   ones run_all.sh keeps for choices) with the block's direction projected out of every block. Eligible: a fall of
   at most 0.15. Chosen: the eligible direction nearest half depth (ties: the cheaper).
2. **Where (a) is planted**: not searched. Plant (a) sits at half depth, the preset's design since its first
   run; for step 3, (c) sits two blocks later (or at the last block, if nearer).
3. **Strength**, in units of the planted block's mean residual norm, on the grid 0.1, 0.15, 0.2, 0.3, 0.45, 0.7,
   1.0: the smallest at which plants (a) and (c) both clear the test subset's detection limit in prospect: z on
   dev × sqrt(16 / dev themes) of at least 2.8 (80% power at two-sided 0.05), and neither plant's own neutral
   log-prob falls by more than 0.15. None passing: no strength is chosen, and the docs say so.
4. **Where (c) is planted** (version 3): at the chosen strength, among blocks half depth + 1 .. n-1, the block
   where plant (c) has the largest predicted test z, of those where its neutral log-prob falls by at most 0.15.
The dev pairs scored are general pairs of themes the plants were not fit on (one per theme, up to 40); the plants
are fit as the preset fits them (12 dev pairs per domain).

Version 1 planted the chosen direction at its own block and searched 0.2-1.0. It chose block 21 at 0.2, which
is the configuration already run on test before the sweep existed (docs/planted_block21): held-out dev predicted
z 4.3 for plant (a) there, and the test subset gave z 1.1 (+0.033 against +0.156 on dev). The block-15 direction
planted at block 15 had kept most of its dev shift on test (+0.229 dev, +0.174 test). Before writing version 2 we
had also seen, on dev only, the block-21 direction planted at blocks 12, 15 and 18 at 0.2: +0.198, +0.221, +0.176,
with plant neutral changes -0.23, -0.155, -0.05. Version 2 is chosen with that knowledge, and says so.
Version 2 (steps 1-3, with (c) at half depth + 2) chose block 21's direction at strength 0.1. Its test run
(docs/planted_u21_c17): plant (a) +0.091 [+0.047, +0.136] (dev +0.102) and ablation "reproduced"; plant (c) at block 17
+0.039 [-0.004, +0.081] (dev +0.074, predicted z 3.2, test z 1.8), so transfer read "not testable". Version 3
adds step 4, written after that run and before its own results.

Inputs:  data/eval/contrastive_pairs.jsonl (dev split only), data/eval/neutral.jsonl (items 56-75).
Outputs: runs/plant_sweep/ (base activations and directions, the cost scan, plants, dev evaluations; every step is
         skipped when its output exists, so a rerun continues), runs/plant_sweep/plant_sweep.json,
         docs/plant_sweep.md. run_all.sh's planted preset carries the chosen direction and strength as constants.

Example:
    python plant_sweep.py              # ~10 min on 2 CPU cores
"""
import argparse
import json
import math
import time
from pathlib import Path

from common import (COHERENCE_MAX_DROP, InputError, cli, fmt_ci, half_depth_layer, load_pt, neutral_parts, read_jsonl,
                    read_pairs, run_script, sweep_arguments, theme_of, theme_subset, write_json, write_jsonl)

GRID = [0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0]  # x the planted block's mean residual norm
Z_NEEDED = 2.8  # the detection limit in SE units: 80% power at two-sided alpha = 0.05
OFFSET_C = 2  # plant (c) sits this many blocks after (a), as in run_all.sh
N_NEUTRAL = 20  # dev neutral answers scored, as many as the planted preset (its NEUTRAL_SUB)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sweep_arguments(p, out="runs/plant_sweep")  # --model, --out, --pairs, --neutral, --docs (plant_sweep.md)
    p.add_argument("--fit-pairs", type=int, default=12, help="dev pairs per domain the plants are fit on (preset: 12)")
    p.add_argument("--eval-pairs", type=int, default=40, help="held-out dev general pairs scored, one per theme")
    p.add_argument("--test-pairs", type=int, default=16, help="general test pairs the preset scores (its SUB)")
    args = p.parse_args(argv)
    if min(args.fit_pairs, args.eval_pairs, args.test_pairs) < 1:
        raise InputError("--fit-pairs, --eval-pairs and --test-pairs must be at least 1")
    return args


def summary_of(path):
    return json.loads(Path(path).read_text())


def step(out, cmd):
    """Run a repo script unless its output exists (a rerun continues)."""
    if not Path(out).exists():
        run_script(cmd)
    return Path(out)


def scored_pairs(args):
    """General dev pairs whose theme none of the fit pairs has, one per theme (theme_subset), written to a file."""
    fit = read_pairs(args.pairs, args.fit_pairs, "dev")
    seen = {theme_of(r) for r in fit}
    rows = [r for r in read_pairs(args.pairs, split="dev") if r["domain"] == "general" and theme_of(r) not in seen]
    rows = theme_subset(rows, args.eval_pairs)
    if not rows:
        raise InputError(f"{args.pairs}: no general dev pairs outside the fit themes")
    path = Path(args.out) / "dev_pairs_heldout.jsonl"
    write_jsonl(path, rows)
    return path, len({theme_of(r) for r in rows})


def block_costs(args, dirs, neutral):
    """{block: neutral log-prob change of the base with that block's direction projected out of every block}, and
    the blocks whose direction is degenerate."""
    out = Path(args.out) / "base" / "cost_scan"
    step(out / "summary.json", ["ablate_eval.py", "--model", args.model, "--out", out, "--n-samples", "0",
                                "--neutral", neutral, "--ablate", dirs, "--direction-layers", "all"])
    s = summary_of(out / "summary.json")
    costs = {int(n.split("_L")[1]): c["vs_none"]["diff"] for n, c in s.get("coherence", {}).items()
             if n.startswith("ablate_L")}
    return costs, sorted(int(n.split("_L")[1]) for n in s.get("not_applicable", {}))


def choose_direction(costs, n_layers):
    """Step 1 of the rule: eligible directions (blocks 1..n-3, cost within the clause), nearest half depth, then
    the cheaper, then the lower block."""
    h = half_depth_layer(n_layers)
    ok = [b for b, c in costs.items() if 1 <= b <= n_layers - 1 - OFFSET_C and c >= -COHERENCE_MAX_DROP]
    return min(ok, key=lambda b: (abs(b - h), -costs[b], b)) if ok else None


def choose_strength(strengths):
    """Step 3: the smallest strength ({strength: {"a": row, "c": row}}) at which both plants pass."""
    ok = [float(s) for s, r in strengths.items() if passes(r["a"]) and passes(r["c"])]
    return min(ok) if ok else None


def shift(args, plant, base_eval, pairs, neutral, n_themes):
    """Plant vs base on the held-out dev pairs: the general shift, its z, the z predicted for the test subset, and
    the plant's own neutral log-prob change."""
    out = plant / "eval_dev"
    step(out / "summary.json", ["ablate_eval.py", "--model", args.model, "--adapter", plant, "--out", out,
                                "--n-samples", "0", "--pairs", pairs, "--split", "dev", "--neutral", neutral,
                                "--reference", base_eval])
    s = summary_of(out / "summary.json")
    g = s["reference_shift"]["general"]
    se = (g["ci"][1] - g["ci"][0]) / 3.92
    z = g["diff"] / se if se > 0 else math.inf
    return {"shift": g["diff"], "ci": g["ci"], "z": z, "z_test": z * math.sqrt(args.test_pairs / n_themes),
            "neutral": s["coherence"]["none"]["vs_reference"]["diff"]}


def passes(r):
    """A plant clears the test subset's detection limit in prospect, and stays coherent."""
    return r["z_test"] >= Z_NEEDED and r["neutral"] >= -COHERENCE_MAX_DROP


def choose_c_block(rows):
    """Step 4: the block ({block: row}) where plant (c) has the largest predicted z, among the coherent ones."""
    ok = [b for b, r in rows.items() if r["neutral"] >= -COHERENCE_MAX_DROP]
    return int(max(ok, key=lambda b: (rows[b]["z_test"], -int(b)))) if ok else None


def write_docs(args, res, n_themes):
    costs, h, d = res["costs"], res["half_depth"], res["direction"]
    last = res["n_layers"] - 1 - OFFSET_C
    lines = ["# The positive control's direction and strength (dev split)", "",
             f"Written by `python plant_sweep.py` ({res['seconds']} s). Model: SmolLM2-135M-Instruct. Everything here "
             "is measured on dev; `bash run_all.sh --preset planted` reports on test with the choice frozen "
             "(docs/method.md#positive-control). The rule is the script's docstring (version 3); what was known "
             "before it was written, including the earlier versions' choices and their test results, is said "
             "there and in docs/method.md.", "",
             "## 1. Which direction can the base model lose?", "",
             f"Neutral log-prob change of the base model (nats/token, {res['n_neutral']} dev neutral answers) with "
             f"the block's dev-pair direction projected out of every block; half depth is block {h}; eligible: a "
             f"fall of at most {COHERENCE_MAX_DROP}, blocks 1..{last}.", "",
             "| block of the direction | cost | eligible |", "|---|---|---|"]
    for b in range(res["n_layers"]):
        if b in res["degenerate"]:
            lines.append(f"| {b} | n/a (degenerate direction) | no |")
        elif str(b) in costs:
            c = costs[str(b)]
            ok = 1 <= b <= last and c >= -COHERENCE_MAX_DROP
            lines.append(f"| {b}{' (half depth)' if b == h else ''} | {c:+.3f} | {'**yes**' if ok else 'no'} |")
    lines += ["", f"**Chosen direction: block {d}'s**." if d is not None else "**No direction is eligible**: on "
              "this model no dev-pair direction can be ablated coherently, so the ablation rule can read "
              "\"partly\" at best.", ""]
    if d is not None:
        lines += ["## 2. Which strength do the plants need?", "",
                  f"Block {d}'s direction planted at block {h} (a) and {h + OFFSET_C} (c). Shift of the general "
                  f"score over the base on {n_themes} held-out dev themes (95% theme-bootstrap interval), its z, the "
                  f"z predicted for the preset's {args.test_pairs} test pairs (z × sqrt({args.test_pairs}/"
                  f"{n_themes})), and the plant's own neutral log-prob change. A strength passes when both plants "
                  f"reach a predicted z of {Z_NEEDED} and neither falls by more than {COHERENCE_MAX_DROP}.", "",
                  "| strength | plant | shift | z | predicted test z | neutral | passes |",
                  "|---|---|---|---|---|---|---|"]
        for s, r in res["strengths"].items():
            for k in ("a", "c"):
                x = r[k]
                lines.append(f"| {s} | ({k}) | {fmt_ci(x['shift'], x['ci'])} | {x['z']:.1f} | {x['z_test']:.1f} | "
                             f"{x['neutral']:+.3f} | {'yes' if passes(x) else 'no'} |")
        st = res["strength"]
        lines += ["", f"**Chosen strength: {st:g}**." if st is not None else
                  "**No strength on the grid passes.**"]
    if res["c_blocks"]:
        lines += ["", "## 3. Where does plant (c) go? (version 3)", "",
                  f"Plant (c), block {d}'s direction at strength {res['strength']:g}, at each block after half depth, "
                  "on the same dev pairs; chosen: the largest predicted test z among the coherent.", "",
                  "| block | shift | z | predicted test z | neutral |", "|---|---|---|---|---|"]
        for b, x in res["c_blocks"].items():
            lines.append(f"| {b} | {fmt_ci(x['shift'], x['ci'])} | {x['z']:.1f} | {x['z_test']:.1f} | "
                         f"{x['neutral']:+.3f} |")
        c = res["blocks"]["c"]
        lines += ["", f"**Chosen block for (c): {c}**." if c is not None else "**No block is coherent for (c).**"]
    (Path(args.docs) / "plant_sweep.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    neutral_rows = neutral_parts(read_jsonl(args.neutral, required=("id", "question", "answer")), N_NEUTRAL)[1]
    if not neutral_rows:
        raise InputError(f"{args.neutral}: fewer than 56 items; the dev neutral answers are items 56-75")
    neutral = out / "neutral_dev.jsonl"
    write_jsonl(neutral, neutral_rows)
    pairs, n_themes = scored_pairs(args)
    fit = ["--pairs", args.pairs, "--split", "dev", "--pairs-per-domain", str(args.fit_pairs)]
    acts = step(out / "base" / "acts_pairs.pt", ["collect_acts.py", "--model", args.model, "--in", args.pairs,
                                                 "--split", "dev", "--pairs-per-domain", str(args.fit_pairs),
                                                 "--out", out / "base" / "acts_pairs.pt"])
    dirs = step(out / "base" / "directions.pt", ["extract_direction.py", "--acts", acts,
                                                 "--out", out / "base" / "directions.pt"])
    n_layers = load_pt(dirs)["directions"].shape[0]
    costs, degenerate = block_costs(args, dirs, neutral)
    direction, h = choose_direction(costs, n_layers), half_depth_layer(n_layers)
    res = {"rule_version": 3, "n_layers": n_layers, "half_depth": h, "n_neutral": len(neutral_rows),
           "costs": {str(b): c for b, c in sorted(costs.items())}, "degenerate": degenerate, "direction": direction,
           "blocks": {"a": h, "c": min(h + OFFSET_C, n_layers - 1)}, "strengths": {}, "strength": None, "c_blocks": {}}
    if direction is not None:
        base_eval = step(out / "base" / "eval_dev" / "summary.json", [
            "ablate_eval.py", "--model", args.model, "--out", out / "base" / "eval_dev", "--n-samples", "0",
            "--pairs", pairs, "--split", "dev", "--neutral", neutral]).parent
        first = {}
        for s in GRID:
            row = {}
            for k, blocks in res["blocks"].items():
                plant = out / f"plant_{k}_u{direction}_L{blocks}_s{s:g}"
                if k not in first:  # the first strength is fit; (c) reuses (a)'s base pass; the others rescale
                    extra = ["--fit-from", first["a"]] if k == "c" else []
                    step(plant / "adapter_model.safetensors", [
                        "plant_organism.py", "--model", args.model, *fit, "--direction", dirs, "--direction-layer",
                        str(direction), "--blocks", str(blocks), "--strength", str(s), *extra, "--out", plant])
                    first[k] = plant
                else:
                    step(plant / "adapter_model.safetensors", ["plant_organism.py", "--rescale", first[k],
                                                               "--strength", str(s), "--out", plant])
                row[k] = shift(args, plant, base_eval, pairs, neutral, n_themes)
                print(f"strength {s:g} plant ({k}): shift {fmt_ci(row[k]['shift'], row[k]['ci'])}, "
                      f"predicted test z {row[k]['z_test']:.1f}, neutral {row[k]['neutral']:+.3f}", flush=True)
            res["strengths"][f"{s:g}"] = row
        res["strength"] = choose_strength(res["strengths"])
    if res["strength"] is not None:
        s = res["strength"]
        for b in range(h + 1, n_layers):
            plant = out / f"plant_c_u{direction}_L{b}_s{s:g}"
            step(plant / "adapter_model.safetensors", [
                "plant_organism.py", "--model", args.model, *fit, "--direction", dirs, "--direction-layer",
                str(direction), "--blocks", str(b), "--strength", str(s), "--fit-from", first["a"], "--out", plant])
            r = res["c_blocks"][str(b)] = shift(args, plant, base_eval, pairs, neutral, n_themes)
            print(f"plant (c) at block {b}: shift {fmt_ci(r['shift'], r['ci'])}, predicted test z "
                  f"{r['z_test']:.1f}, neutral {r['neutral']:+.3f}", flush=True)
        res["blocks"]["c"] = choose_c_block(res["c_blocks"])
    res["seconds"] = round(time.time() - t0)
    write_json(out / "plant_sweep.json", res)
    write_docs(args, res, n_themes)
    print(f"wrote {out}/plant_sweep.json and {args.docs}/plant_sweep.md: direction of block {direction} planted at "
          f"{h}, strength {res['strength']}")


if __name__ == "__main__":
    cli(main)
