"""Training dynamics of a rank-1 organism: does misalignment appear together with a sudden rotation of its B vectors?

Reproduces the training-dynamics (phase-transition) analysis of the companion paper "Model Organisms for Emergent
Misalignment" (arXiv 2506.11613): during training the rank-1 adapters' B vectors (the directions they write into
the residual stream) rotate suddenly, at about the step where misalignment appears. Here misalignment is the
judge-free contrastive score (common.contrastive_score on the chosen split of the contrastive pairs), so the whole
analysis runs without a judge.

For step 0 (the base model, no adapter; scored once) and every checkpoint of a train_rank1.py run, in step order:
- the contrastive score per domain (mean delta with its 95% bootstrap interval; common.contrastive_by_domain),
- the paired shift vs step 0 per domain (common.paired_by_id over the same pairs: mean, 95% CI, p),
- the paired change vs the previous step per domain (the same pairs at step t and at the step before),
- per adapter layer: the B vector's norm, its cosine with the final adapter's B vector at that layer, and the
  local cosine with the previous checkpoint's B vector (undefined at the first checkpoint: B starts at zero),
- the training loss logged at that step (train_log.jsonl).
The base model is loaded once; checkpoints are swapped in as PEFT adapters on it. "Final" is the run's finished
adapter (DIR/adapter_model.safetensors), or the last checkpoint while the run is unfinished. Every interval over
pairs resamples themes (the paraphrases of one question are one cluster; sign flips flip whole themes).

Two summary steps, by fixed rules:
- Largest rotation: the step with the lowest mean local cosine over layers, counted only from the first checkpoint
  whose mean ‖B‖ (over layers) reaches 10% of the final adapter's ("rotation_from_step"; its own local cosine, with
  the checkpoint before, is included). B starts at zero, so the first steps' directions are barely formed and their
  local cosines are low by construction; steps before the threshold are excluded.
- Largest rise: a step counts as a rise of the general score only when its paired change vs the previous step (the
  same general pairs at both steps, common.paired_by_id with theme clusters) has a 95% interval above 0; the
  largest rise is the one of those with the largest mean change, or null ("no step-to-step rise whose interval
  excludes 0"). An argmax of point estimates would pick noise.

Inputs:  --run DIR, a train_rank1.py output dir trained with --save-every N (checkpoints/step_N/ PEFT adapters,
         train_log.jsonl); the contrastive pairs (--pairs, --split, --pairs-per-domain).
Outputs: in --out (default DIR/dynamics):
         dynamics.jsonl  one row per step (scores, per-pair deltas, shifts, geometry, loss), appended as each step
                         finishes; a rerun skips the steps already there (same settings only) and scores the rest,
         dynamics.json   summary: "steps" (the rows without per-pair deltas; geometry recomputed from the current
                         adapters; "change_vs_previous" per domain), "rotation_from_step", "largest_rotation_step",
                         "largest_rotation_mean_local_cos", "largest_rise_step", "largest_rise", "largest_rise_ci",
                         "significant_rise_steps", "rise_note" (the rules above; see summarize);
         in --plots (default = --out): dynamics.png, three panels over steps: paired shift vs base (general, medical,
         95% CI); B norm per layer with the training loss on a twin axis; local cosine per layer and the cosine
         with the final adapter.

Example:
    python dynamics.py --run runs/sweep/r1_lr1e-3_ep3_n120 --pairs-per-domain 40
"""
import argparse
import hashlib
import json
import math
import re
import sys
from pathlib import Path

import torch

from common import (DEFAULT_MODEL, InputError, append_jsonl, check_adapter_fits, cli, contrastive_by_domain, fmt_ci,
                    load_model, paired_by_id, pyplot, read_jsonl, read_pairs, save_figure, sha256_file, theme_of,
                    write_json, write_jsonl)

DOMAINS = ("general", "medical")  # the domains reported and plotted (others are scored and kept in the rows)
ROTATION_NORM_FRAC = 0.1  # rotation counts from the first checkpoint whose mean ‖B‖ reaches this share of final
NO_RISE = "no step-to-step rise whose interval excludes 0"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="train_rank1.py output dir with checkpoints/step_N/")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the run's base model")
    p.add_argument("--pairs", default="data/eval/contrastive_pairs.jsonl", help="contrastive pairs JSONL")
    p.add_argument("--split", default="dev", choices=["dev", "test", "all"], help="pairs scored (default dev)")
    p.add_argument("--pairs-per-domain", type=int, default=None, help="first N pairs of each domain (faster)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="output dir (default RUN/dynamics)")
    p.add_argument("--plots", default=None, help="plot dir (default = --out)")
    args = p.parse_args(argv)
    if args.pairs_per_domain is not None and args.pairs_per_domain < 1:
        raise InputError(f"--pairs-per-domain: expected a positive integer, got {args.pairs_per_domain}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    args.out = Path(args.out) if args.out else Path(args.run) / "dynamics"
    args.plots = Path(args.plots) if args.plots else args.out
    return args


# ----------------------------------------------------------------------------------------------- run files


def list_checkpoints(run):
    """[(step, dir)] of checkpoints/step_N, by step. train_rank1 renames finished checkpoints into place, so a
    step_N dir is complete; one without an adapter is not a checkpoint of this kind and is refused."""
    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{run}: no such directory")
    found = []
    for d in (run / "checkpoints").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if not m or not d.is_dir():
            continue
        if not (d / "adapter_model.safetensors").exists() or not (d / "adapter_config.json").exists():
            raise InputError(f"{d}: not a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)")
        found.append((int(m.group(1)), d))
    if not found:
        raise InputError(f"{run}: no checkpoints/step_N/ adapters (train with train_rank1.py --save-every N)")
    return sorted(found)


def b_vectors(adapter_dir):
    """{layer: B vector (float64)} of a rank-1 down_proj LoRA adapter; anything else is an InputError."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.exists():
        raise InputError(f"{adapter_dir}: no adapter_model.safetensors")
    out = {}
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                if ".lora_B." not in k:
                    continue
                m = re.search(r"\.layers\.(\d+)\.", k)
                if ".down_proj." not in k or not m:
                    raise InputError(f"{adapter_dir}: expected LoRA on down_proj only, found {k}")
                w = f.get_tensor(k)
                if w.ndim != 2 or w.shape[1] != 1:
                    raise InputError(f"{adapter_dir}: B vectors need a rank-1 adapter, got {k} of shape "
                                     f"{tuple(w.shape)}")
                out[int(m.group(1))] = w[:, 0].double()
    except InputError:
        raise
    except Exception as e:  # safetensors raises its own types for a damaged file
        raise InputError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    if not out:
        raise InputError(f"{adapter_dir}: no LoRA B weights in adapter_model.safetensors")
    return out


def read_losses(run):
    """{step: training loss} from train_log.jsonl ({} with a note when the log is missing)."""
    path = Path(run) / "train_log.jsonl"
    if not path.exists():
        print(f"note: {path} not found; losses are left empty", file=sys.stderr)
        return {}
    return {int(r["step"]): r["loss"] for r in read_jsonl(path, required=("step", "loss"), tolerate_torn_tail=True)}


# ----------------------------------------------------------------------------------------------- geometry


def cosine(a, b):
    """Cosine of two vectors; None when either is zero (a B vector at initialisation has no direction)."""
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 or nb == 0:
        return None
    return (a @ b).item() / (na * nb)


def mean_or_none(values):
    values = list(values)
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def geometry(bvecs, final):
    """{step: {"b_norm", "cos_final", "local_cos": {layer: value}} + their means over layers}.

    bvecs: [(step, {layer: B})] in step order, starting with step 0 (the base model: B = 0, as LoRA initialises it).
    Local cosine is with the previous entry's B vector, so it is undefined for step 0 and the first checkpoint.
    """
    out, prev = {}, None
    for step, vecs in bvecs:
        g = {"b_norm": {str(l): v.norm().item() for l, v in sorted(vecs.items())},
             "cos_final": {str(l): cosine(v, final[l]) for l, v in sorted(vecs.items())},
             "local_cos": {str(l): cosine(v, prev[l]) if prev is not None else None for l, v in sorted(vecs.items())}}
        for k in ("b_norm", "cos_final", "local_cos"):
            g[f"mean_{k}"] = mean_or_none(g[k].values())
        out[step] = g
        prev = vecs
    return out


# ----------------------------------------------------------------------------------------------- scoring


def pairs_fingerprint(pairs):
    return hashlib.sha256(json.dumps(pairs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def domain_ids(pairs):
    out = {}
    for p in pairs:
        out.setdefault(p["domain"], []).append(p["id"])
    return out


def score_row(scores, base_deltas, ids_by_domain, themes=None):
    """The score part of a row: per-domain summaries, per-pair deltas (and themes) by id and paired shifts vs step 0
    (clustered by `themes`, {id: theme})."""
    deltas = scores["deltas"]
    base = deltas if base_deltas is None else base_deltas
    return {"score": {k: v for k, v in scores.items() if k not in ("deltas", "themes")}, "deltas": deltas,
            "themes": themes, "shift": {d: paired_by_id(deltas, base, ids, themes)
                                        for d, ids in sorted(ids_by_domain.items())}}


def check_settings(rows, settings, path):
    """Rows scored under other settings (model, pairs) would mix two measurements into one table: refuse."""
    for r in rows:
        old = r.get("settings", {})
        for k in settings:
            if old.get(k) != settings[k]:
                raise InputError(f"{path}: step {r.get('step')} was scored with another {k} "
                                 f"({json.dumps(old.get(k))} -> {json.dumps(settings[k])}); use another --out")


def check_adapters_unchanged(rows, ckpts, path):
    """A row whose checkpoint file changed since (the run was retrained in place) no longer describes it."""
    by_step = dict(ckpts)
    for r in rows:
        if r["step"] == 0:
            continue
        d = by_step.get(r["step"])
        if d is None:
            raise InputError(f"{path}: step {r['step']} has no checkpoint in the run any more; use another --out")
        if r.get("adapter_sha256") != sha256_file(d / "adapter_model.safetensors"):
            raise InputError(f"{path}: checkpoint step_{r['step']} changed since it was scored; use another --out")


class AdapterSwapper:
    """One base model; each checkpoint is loaded as a named PEFT adapter, made active, and the previous one dropped."""

    def __init__(self, base):
        self.base, self.model, self.name = base, None, None

    def load(self, path, name):
        from peft import PeftModel

        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name)
        else:
            self.model.load_adapter(str(path), adapter_name=name)
            self.model.set_adapter(name)
            self.model.delete_adapter(self.name)
        self.name = name
        self.model.eval()
        return self.model


# ----------------------------------------------------------------------------------------------- summary and plot


def rotation_start(steps, final_norm):
    """(first step whose mean ‖B‖ reaches ROTATION_NORM_FRAC of final_norm, that norm threshold); (None, threshold)
    when none does or the final adapter has no norm."""
    if not final_norm:
        return None, None
    threshold = ROTATION_NORM_FRAC * final_norm
    return next((s["step"] for s in steps if s["mean_b_norm"] is not None and s["mean_b_norm"] >= threshold),
                None), threshold


def summarize(rows, geom, losses, meta, ids_by_domain, themes=None, final_norm=None):
    """dynamics.json by the rules of the module docstring: rows in step order (no per-pair deltas; geometry and loss
    from the current run files; each with its paired change vs the previous step per domain) and the steps of
    largest rotation and of largest significant rise of the general score.

    ids_by_domain: {domain: [pair id]}; themes: {pair id: theme} (clusters of the paired intervals; None: each pair
    its own); final_norm: the final adapter's mean ‖B‖ over layers (None: that of the last step).
    """
    steps, prev = [], None
    for r in sorted(rows, key=lambda r: r["step"]):
        row = {k: v for k, v in r.items() if k not in ("deltas", "settings", "themes")}
        row.update(geom[r["step"]])
        row["loss"] = losses.get(r["step"])
        row["change_vs_previous"] = None if prev is None else {
            d: paired_by_id(r["deltas"], prev["deltas"], ids, themes) for d, ids in sorted(ids_by_domain.items())}
        steps.append(row)
        prev = r
    if final_norm is None and steps:
        final_norm = steps[-1]["mean_b_norm"]
    start, threshold = rotation_start(steps, final_norm)
    rot = [(s["mean_local_cos"], s["step"]) for s in steps
           if start is not None and s["step"] >= start and s["mean_local_cos"] is not None]
    rises = [(s["change_vs_previous"]["general"], s["step"]) for s in steps
             if s["change_vs_previous"] and "general" in s["change_vs_previous"]]
    significant = [(c["diff"], step, c["ci"]) for c, step in rises if c["ci"][0] is not None and c["ci"][0] > 0]
    best = max(significant, key=lambda x: x[0]) if significant else None
    return {**meta, "steps": steps,
            "rotation_from_step": start,
            "rotation_rule": f"lowest mean local cosine from the first checkpoint whose mean ‖B‖ reaches "
                             f"{ROTATION_NORM_FRAC:.0%} of the final adapter's ({fmt(final_norm, 4)} -> threshold "
                             f"{fmt(threshold, 4)}); earlier steps excluded",
            "largest_rotation_step": min(rot)[1] if rot else None,
            "largest_rotation_mean_local_cos": min(rot)[0] if rot else None,
            "rise_rule": "largest mean paired change of the general score vs the previous step among the steps whose "
                         "95% interval (themes resampled) lies above 0",
            "significant_rise_steps": [step for _, step, _ in significant],
            "largest_rise_step": best[1] if best else None,
            "largest_rise": best[0] if best else None,
            "largest_rise_ci": best[2] if best else None,
            "rise_note": None if best else NO_RISE}


def plot(summary, losses, path):
    plt = pyplot()
    steps = summary["steps"]
    x = [s["step"] for s in steps]
    layers = summary["layers"]
    fig, axes = plt.subplots(3, 1, figsize=(8, 10), sharex=True)
    ax = axes[0]
    for d, colour, off in (("general", "tab:red", -0.1), ("medical", "tab:blue", 0.1)):
        pts = [(s["step"], s["shift"][d]) for s in steps if d in s["shift"] and s["shift"][d]["diff"] is not None]
        if not pts:
            continue
        xs = [p[0] + off for p in pts]
        ys = [p[1]["diff"] for p in pts]
        err = [[y - p[1]["ci"][0] for y, p in zip(ys, pts)], [p[1]["ci"][1] - y for y, p in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, color=colour, label=f"{d} (n={pts[0][1]['n']})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(ylabel="shift of mean delta vs base", title="contrastive score: paired shift vs step 0 (95% CI)")
    ax.legend(fontsize=8)

    ax = axes[1]
    for l in layers:
        ax.plot(x, [s["b_norm"][str(l)] for s in steps], lw=0.8, marker=".", label=f"L{l}")
    ax.set(ylabel="||B||", title="B vector norm per layer (loss: grey, right axis)")
    ax.legend(fontsize=6, ncol=max(1, math.ceil(len(layers) / 5)), loc="upper left")
    if losses:
        tw = ax.twinx()
        ls = sorted(losses)
        tw.plot(ls, [losses[s] for s in ls], color="grey", lw=1, alpha=0.7)
        tw.set_ylabel("training loss", color="grey")

    ax = axes[2]
    for l in layers:
        ax.plot(x, [s["local_cos"][str(l)] if s["local_cos"][str(l)] is not None else float("nan") for s in steps],
                lw=0.6, alpha=0.6)
    nan = float("nan")
    ax.plot(x, [s["mean_local_cos"] if s["mean_local_cos"] is not None else nan for s in steps], color="k", lw=2,
            marker="o", ms=4, label="local cosine (previous checkpoint), mean; thin: per layer")
    ax.plot(x, [s["mean_cos_final"] if s["mean_cos_final"] is not None else nan for s in steps], color="tab:green",
            lw=2, ls="--", marker="s", ms=4, label="cosine with final adapter, mean over layers")
    shown = [v for s in steps for v in [*s["local_cos"].values(), s["mean_cos_final"]] if v is not None]
    low = max(-1.05, min(shown, default=0.0) - 0.05)  # zoom in: a smooth run stays near 1 throughout
    ax.set(xlabel="training step", ylabel="cosine", ylim=(low, 1.02), title="B vector rotation")
    ax.legend(fontsize=7, loc="lower right")
    for a in axes:
        if summary["largest_rotation_step"] is not None:
            a.axvline(summary["largest_rotation_step"], color="tab:purple", ls=":", lw=1)
        if summary["rotation_from_step"] is not None:
            a.axvspan(x[0], summary["rotation_from_step"], color="grey", alpha=0.08, lw=0)
    fig.suptitle(f"{summary['run']}: training dynamics (dotted: largest rotation; shaded: before ‖B‖ reaches "
                 f"{ROTATION_NORM_FRAC:.0%} of final, not counted)", fontsize=9)
    save_figure(fig, path)


def fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def table_line(row, g, loss):
    sc, sh = row["score"], row["shift"]
    return (f"{row['step']:>6} {fmt(loss):>7} "
            + " ".join(f"{fmt(sc.get(d, {}).get('mean_delta')):>8}" for d in DOMAINS) + " "
            + " ".join(f"{fmt_ci(sh[d]['diff'], sh[d]['ci']) if d in sh else 'n/a':>26}" for d in DOMAINS)
            + f" {fmt(g['mean_b_norm']):>7} {fmt(g['mean_local_cos']):>6} {fmt(g['mean_cos_final']):>6}")


TABLE_HEADER = (f"{'step':>6} {'loss':>7} {'gen d':>8} {'med d':>8} {'shift general':>26} {'shift medical':>26} "
                f"{'|B|':>7} {'local':>6} {'final':>6}")


# ----------------------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    run = Path(args.run)
    # Every input is checked before the model is loaded or --out is touched.
    ckpts = list_checkpoints(run)
    bvecs = [(step, b_vectors(d)) for step, d in ckpts]
    final_dir = run if (run / "adapter_model.safetensors").exists() else ckpts[-1][1]
    final = b_vectors(final_dir)
    layers = sorted(final)
    for step, vecs in bvecs:
        if sorted(vecs) != layers:
            raise InputError(f"{run}: checkpoint step_{step} has adapters at layers {sorted(vecs)}, the final adapter "
                             f"at {layers}")
    if final_dir != run:
        print(f"note: {run} has no final adapter yet (unfinished run); 'final' is {final_dir.name}", file=sys.stderr)
    losses = read_losses(run)
    pairs = read_pairs(args.pairs, args.pairs_per_domain, args.split)
    ids_by_domain = domain_ids(pairs)
    themes = {p["id"]: theme_of(p) for p in pairs}
    zero = {l: torch.zeros_like(v) for l, v in final.items()}
    geom = geometry([(0, zero)] + bvecs, final)
    settings = {"model": args.model, "split": args.split, "pairs_per_domain": args.pairs_per_domain,
                "pairs_sha256": pairs_fingerprint(pairs)}

    jsonl = args.out / "dynamics.jsonl"
    rows = []
    if jsonl.exists():
        by_step = {r["step"]: r for r in read_jsonl(jsonl, required=("step", "score", "deltas"),
                                                    tolerate_torn_tail=True)}
        rows = sorted(by_step.values(), key=lambda r: r["step"])
        check_settings(rows, settings, jsonl)
        check_adapters_unchanged(rows, ckpts, jsonl)
        write_jsonl(jsonl, rows)  # drop a torn last line (and duplicates) before appending
    else:
        args.out.mkdir(parents=True, exist_ok=True)
    done = {r["step"]: r for r in rows}
    todo = [(s, d) for s, d in [(0, None)] + ckpts if s not in done]
    print(f"{run}: {len(ckpts)} checkpoints (steps {ckpts[0][0]}..{ckpts[-1][0]}), layers {layers}, "
          f"{len(pairs)} {args.split} pairs; {len(todo)} of {len(ckpts) + 1} steps to score")
    print(TABLE_HEADER)
    model = tok = swapper = None
    if todo:
        model, tok = load_model(args.model)
        for _, d in ckpts:
            check_adapter_fits(model, d)
        swapper = AdapterSwapper(model)
    for step, d in [(0, None)] + ckpts:
        if step in done:
            row = done[step]
            print(table_line(row, geom[step], losses.get(step)) + "  (done)")
            continue
        m = model if d is None else swapper.load(d, f"step_{step}")
        scores = contrastive_by_domain(m, tok, pairs, args.batch_size)
        base = None if step == 0 else done[0]["deltas"]
        row = {"step": step, "checkpoint": None if d is None else str(d.relative_to(run)),
               "adapter_sha256": None if d is None else sha256_file(d / "adapter_model.safetensors"),
               "loss": losses.get(step), **score_row(scores, base, ids_by_domain, themes),
               "b_norm": geom[step]["b_norm"], "local_cos": geom[step]["local_cos"],
               "cos_final": geom[step]["cos_final"], "final": str(final_dir), "settings": settings}
        append_jsonl(jsonl, [row])
        done[step] = row
        print(table_line(row, geom[step], losses.get(step)), flush=True)

    meta = {"run": str(run), "model": args.model, "pairs": str(args.pairs), "split": args.split,
            "pairs_per_domain": args.pairs_per_domain, "n_pairs": {d: len(ids) for d, ids in ids_by_domain.items()},
            "layers": layers, "final_adapter": "adapter_model.safetensors" if final_dir == run else
            f"{final_dir.relative_to(run)} (run unfinished)"}
    final_norm = sum(v.norm().item() for v in final.values()) / len(final)
    summary = summarize(list(done.values()), geom, losses, meta, ids_by_domain, themes, final_norm)
    write_json(args.out / "dynamics.json", summary)
    plot(summary, losses, args.plots / "dynamics.png")
    last = summary["steps"][-1]
    sh = last["shift"].get("general")
    print(f"dynamics of {run}: {len(ckpts)} checkpoints to step {last['step']}; general shift at the last "
          f"{fmt_ci(sh['diff'], sh['ci']) if sh else 'n/a'}; largest rotation at step "
          f"{summary['largest_rotation_step']} (mean local cos {fmt(summary['largest_rotation_mean_local_cos'])}, "
          f"counted from step {summary['rotation_from_step']}), largest rise "
          + (f"at step {summary['largest_rise_step']} ({fmt_ci(summary['largest_rise'], summary['largest_rise_ci'])})"
             if summary["largest_rise_step"] is not None else f"none ({summary['rise_note']})")
          + f" -> {args.out / 'dynamics.json'}, {args.plots / 'dynamics.png'}")


if __name__ == "__main__":
    cli(main)
