"""A planted positive control: a rank-1 down_proj "organism" that writes a KNOWN direction (beyond the paper).

The paper's analyses (model-diff direction §3.5, ablation and transfer §3.3-3.4, adapter probes §4) are run on
trained organisms, where nobody knows what the adapters write. This script builds an adapter whose answer is known:
a standard PEFT rank-1 LoRA on the MLP down_proj of the chosen block(s), exactly the shape train_rank1.py trains,
that adds s·(A·x)·u to the residual stream at each planted block, with u a unit direction you choose. Every script
loads it like a trained organism (common.load_model(name, adapter=DIR)), so each analysis can be checked against
the truth: the model-diff direction should recover u at the planted block and be degenerate below it; ablating u
at the planted block should remove the whole plant; the score should shift only if the rest of the network reads u.

The LoRA (docs/method.md#adapter-probes): down_proj's output gains scale·B·(A·x), x = down_proj's input at that
token, scale = lora_alpha/sqrt(r) (rsLoRA). Here r = 1 and lora_alpha = 1, so scale = 1, and the stored B is s·u:
the write is exactly s·(A·x)·u (tests/test_plant.py checks it to float precision).

Why this A. A = m/‖m‖², with m the token-weighted mean of down_proj's input over the answer tokens of the dev pairs,
both answers of every pair: then the mean of A·x over those tokens is exactly 1, so the planted block adds s·u per
answer token on average, and the model-diff direction (mean planted minus mean base activation over the same texts,
paper §3.5) at the first planted block is exactly s·u (on any other texts it is s·mean(A·x)·u: still exactly along
u, since the blocks below are untouched). A·x is one label-free scalar: it is fit on aligned and misaligned answers
alike, so in *activation* the plant shifts both answers of a pair by the same kind of vector, and any effect on the
misalignment score comes from how the layers above read u, not from a scalar that knows the label (label-blind by
construction, not label-independent in value: on SmolLM2, 16 dev pairs, the per-answer mean A·x is 1.005 on
misaligned and 1.002 on aligned answers, AUC 0.52). In gated MLPs down_proj's input has a large mean component, so
A·x is positive on essentially every token (SmolLM2-135M, block 15, 16 dev pairs: all 2161 answer tokens, min 0.25,
std 0.22; the random tiny test model: 687 of 688); the run reports the share, minimum and spread (run_config.json
"planted"."ax"). A least-squares A (A·x ≈ 1 on every token; std 0.05 on SmolLM2) would be steadier, but it fits the
dev tokens with as many free numbers as down_proj is wide, and the mean needs no regularisation to choose.

The strength. s = --strength × the block's mean residual norm, ‖h_b‖ averaged over the same answer tokens at the
output of block b of the base model (the unit that steering scales use, docs/method.md#steering), so a strength
means the same at any depth. Blocks are fit from the lowest up, each with the plants below it in place, so each
block's mean A·x on the fit texts is exactly 1 even when several blocks are planted.

Which u. --direction FILE --direction-layer L: u = unit(directions[L]) of a directions file (extract_direction.py:
e.g. the base model's dev-pair misalignment direction). --orthogonal-to FILE: a random unit vector (seeded by
--seed) with directions[L] projected out, the negative control. --direction-layer defaults to the first planted
block; set it to plant a direction at another block (e.g. block L's direction at a later block).

The three plants to run: (a) the base model's dev-pair direction at one block (should raise the misalignment
score), (b) a unit vector orthogonal to it at the same block (negative control: no shift expected), (c) the same u
as (a) at a later block (a second fine-tune, for transfer).

Inputs:  a directions file (.pt, .gguf or .safetensors, common.read_directions), the contrastive pairs (--pairs,
         --split dev; never test: the plant's effect is measured there).
Outputs (in --out, written to a temp dir and renamed into place):
         adapter_config.json + adapter_model.safetensors (a standard PEFT adapter), fit_stats.pt (the base pass),
         run_config.json (train_rank1.py's keys that other scripts read: model, n_layers, layers, resolved_layers,
         rank, alpha, rslora, modules, lora_scale; plus "planted": blocks, strength, resid_norm, s, u source,
         cos(u, source direction), A·x statistics, and the model-diff check),
         planted_u.pt (a directions file: row i = u at every block, so ablate_eval.py --ablate DIR/planted_u.pt
         ablates the known u and extract_direction.py --compare compares with it; plus "u", "A", "s" per block).

--rescale DIR --strength S writes DIR's plant at another strength (B scaled by S / its strength; no model pass).

--fit-from DIR builds a plant from DIR's base-model pass (DIR/fit_stats.pt, which every plant writes: the mean
down_proj input at every block and the residual norms over the fit tokens), so a second plant on the same model and
fit pairs costs no base pass; it also skips the check pass (run_config.json "planted"."model_diff" and "ax" are
null). The write is exact by construction (tests/test_plant.py), and the first plant's check measured this fit.

Example:
    python collect_acts.py --in data/eval/contrastive_pairs.jsonl --split dev --out runs/x/base/acts_pairs.pt
    python extract_direction.py --acts runs/x/base/acts_pairs.pt --out runs/x/base/directions.pt
    python plant_organism.py --direction runs/x/base/directions.pt --direction-layer 15 --blocks 15 \
        --strength 0.5 --out runs/x/plant_a
"""
import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import (DEFAULT_MODEL, InputError, answer_batches, causal_lm, cli, decoder_layers, degenerate_layers,
                    half_depth_layer, hidden_size, input_device, load_model, read_directions, read_pairs,
                    record_resid, resolve_model, write_json)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", required=True, help="output directory (a PEFT adapter + run_config.json)")
    p.add_argument("--direction", default=None, help="directions file: plant u = unit(directions[L])")
    p.add_argument("--orthogonal-to", default=None,
                   help="directions file: plant a seeded random unit vector orthogonal to directions[L]")
    p.add_argument("--direction-layer", type=int, default=None, help="L (default: the first planted block)")
    p.add_argument("--blocks", default=None, help="comma-separated planted blocks (default: half depth)")
    p.add_argument("--strength", type=float, default=0.5, help="s in units of the block's mean residual norm")
    p.add_argument("--seed", type=int, default=0, help="seed of the --orthogonal-to random vector")
    p.add_argument("--pairs", default="data/eval/contrastive_pairs.jsonl", help="contrastive pairs JSONL")
    p.add_argument("--split", default="dev", help="the pairs A and the norms are fit on (dev; never test)")
    p.add_argument("--pairs-per-domain", type=int, default=None, help="a fixed subset of N pairs per domain (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fit-from", default=None,
                   help="an earlier plant of the same model and fit pairs: reuse its base-model pass (fit_stats.pt) "
                        "and skip the check pass")
    p.add_argument("--rescale", default=None,
                   help="an existing plant: write the same plant at --strength (B scaled; no model pass needed)")
    return p.parse_args(argv)


def check_args(args):
    """Everything wrong with the input that needs no model is refused before the model loads."""
    if (args.direction is None) == (args.orthogonal_to is None):
        raise InputError("give exactly one of --direction FILE (plant its direction) or --orthogonal-to FILE "
                         "(plant a random direction orthogonal to it)")
    if not (math.isfinite(args.strength) and args.strength > 0):
        raise InputError(f"--strength must be a positive number (units of the block's mean residual norm), "
                         f"got {args.strength}")
    if args.batch_size < 1 or (args.pairs_per_domain or 0) < 0:
        raise InputError("--batch-size must be at least 1 and --pairs-per-domain at least 0 (0: every pair)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not empty; choose another --out")
    if args.split == "test":
        raise InputError("--split test: the plant is fit on dev pairs only; the test pairs are where its effect is "
                         "measured")


def fit_pairs(args):
    """Both answers of every pair of the fit split; a file holding test pairs is refused (see check_args)."""
    rows = read_pairs(args.pairs, args.pairs_per_domain, args.split)
    if any(r.get("split") == "test" for r in rows):
        raise InputError(f"{args.pairs}: --split {args.split} includes test pairs; fit the plant on dev pairs only")
    return rows, [(r["question"], r[side]) for r in rows for side in ("aligned", "misaligned")]


def reused_fit(path, args, rows):
    """The base-model pass of an earlier plant (its fit_stats.pt), refused unless it was made on the same model and
    the same fit pairs (then its sums are exactly what this plant's own base pass would give)."""
    f = Path(path) / "fit_stats.pt"
    if not f.is_file():
        raise InputError(f"--fit-from {path}: no fit_stats.pt there (not a plant_organism.py output)")
    st = torch.load(f, weights_only=False)
    want = {"model": args.model, "pair_ids": [r["id"] for r in rows]}
    if {k: st.get(k) for k in want} != want:
        raise InputError(f"--fit-from {path}: it was fit on another model or other pairs ({st.get('model')}, "
                         f"{len(st.get('pair_ids', []))} pairs); give the same --model, --pairs, --split and "
                         f"--pairs-per-domain")
    return st


def model_shape(name):
    """(blocks, d_model) from the model's config alone, so a bad block or direction fails before a 14B load."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(resolve_model(name)).get_text_config()
        return int(cfg.num_hidden_layers), int(cfg.hidden_size)
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None


def parse_blocks(spec, n_layers):
    if spec is None:
        return [half_depth_layer(n_layers)]
    try:
        blocks = sorted({int(x) for x in str(spec).split(",") if x.strip()})
    except ValueError:
        raise InputError(f"--blocks: expected comma-separated block indices, got {spec!r}") from None
    if not blocks:
        raise InputError("--blocks: no block given")
    bad = [b for b in blocks if not 0 <= b < n_layers]
    if bad:
        raise InputError(f"block {bad[0]} is out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
    return blocks


def source_direction(path, layer, n_layers, width):
    """directions[layer] of a directions file, checked: the model's width and depth, a usable (non-degenerate)
    vector. Returns (vector, file meta)."""
    d = read_directions(path)
    dirs = d["directions"]
    if dirs.shape[1] != width:
        raise InputError(f"{path}: directions of width {dirs.shape[1]}, but the model's d_model is {width}")
    if dirs.shape[0] > n_layers:
        raise InputError(f"{path}: directions for {dirs.shape[0]} layers, but the model has {n_layers} blocks")
    if not 0 <= layer < dirs.shape[0]:
        raise InputError(f"--direction-layer {layer} is out of range: {path} has layers 0..{dirs.shape[0] - 1}")
    v = dirs[layer].float()
    if not torch.isfinite(v).all():
        raise InputError(f"{path}: the direction at layer {layer} has non-finite values")
    if layer in degenerate_layers(dirs, d["resid_norm"]) or not v.norm() > 0:
        raise InputError(f"{path}: the direction at layer {layer} is degenerate (negligible norm): it has no unit "
                         f"vector to plant")
    if d["meta"].get("split") == "test":
        raise InputError(f"{path} was built on test pairs; build the direction to plant on dev pairs")
    return v, d["meta"]


def planted_direction(v, orthogonal, seed):
    """u = unit(v), or a seeded Gaussian vector with v projected out, normalised (the negative control)."""
    v_hat = v / v.norm()
    if not orthogonal:
        return v_hat
    g = torch.randn(v.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g - (g @ v_hat.double()) * v_hat.double()
    return (g / g.norm()).float()


@torch.inference_mode()
def measure(model, tok, items, batch_size, x_blocks=(), A=None, desc="measuring"):
    """One teacher-forced pass over the answers' own tokens (token-weighted, as collect_acts/extract_direction).

    Returns {"n": answer tokens, "sum_h": [n_layers, d] sum of every block's output, "sum_norm": [n_layers] sum of
    its norm, "sum_x": {b: sum of down_proj's input at block b}, and with A={b: A_b} "ax": {b: A_b·x statistics}}.
    Per-batch sums are fp32, their totals float64.
    """
    from tqdm import tqdm

    blocks = decoder_layers(model)
    layers = list(range(len(blocks)))
    dev = input_device(model)
    xs = {}
    handles = [blocks[b].mlp.down_proj.register_forward_pre_hook(
        lambda mod, args, b=b: xs.__setitem__(b, args[0].detach())) for b in x_blocks]
    width = hidden_size(model)
    acc = {"n": 0, "sum_h": torch.zeros(len(layers), width, dtype=torch.float64),
           "sum_norm": torch.zeros(len(layers), dtype=torch.float64), "sum_x": {}, "ax": {}}
    ax_all = {b: [] for b in (A or {})}
    bar = tqdm(total=len(items), desc=desc, unit="ans", disable=len(items) < 64)
    try:
        with record_resid(model, layers) as acts:
            for idx, ids, mask, spans in answer_batches(tok, items, batch_size):
                causal_lm(model).model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
                sel = torch.zeros(ids.shape, dtype=torch.bool)
                for row, (s, e) in enumerate(spans):
                    sel[row, s:e] = True
                acc["n"] += int(sel.sum())
                for i in layers:  # one layer at a time: all of them at once would not fit at 14B
                    h = acts[i][sel.to(acts[i].device)].float()
                    acc["sum_h"][i] += h.sum(0).double().cpu()
                    acc["sum_norm"][i] += h.norm(dim=-1).sum().double().cpu()
                for b in x_blocks:
                    x = xs[b][sel.to(xs[b].device)].float()
                    acc["sum_x"][b] = x.sum(0).double().cpu() + acc["sum_x"].get(b, 0)
                    if b in ax_all:
                        ax_all[b].append((x @ A[b].to(x.device, torch.float32)).double().cpu())
                bar.update(len(idx))
    finally:
        for hd in handles:
            hd.remove()
        bar.close()
    for b, parts in ax_all.items():
        ax = torch.cat(parts)
        acc["ax"][b] = {"share_positive": float((ax > 0).double().mean()), "min": float(ax.min()),
                        "mean": float(ax.mean()), "std": float(ax.std()), "n_tokens": len(ax)}
    return acc


def lora_modules(model, block):
    return decoder_layers(model)[block].mlp.down_proj


def set_plant(model, block, A, B):
    """Write the rank-1 weights of one block's down_proj LoRA: lora_A = A (1 x d_mlp), lora_B = B (d_model x 1)."""
    mod = lora_modules(model, block)
    a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
    # fp32 weights, as train_rank1.py trains and saves them; clone: no inference-mode tensor becomes a parameter
    a.data = A.reshape(1, -1).to(a.device, torch.float32).clone()
    b.data = B.reshape(-1, 1).to(b.device, torch.float32).clone()


def planted_dirs(path, blocks):
    """The source file's direction at each planted block (for cos(u, v_b)); degenerate or absent rows left out."""
    d = read_directions(path)
    skip = set(degenerate_layers(d["directions"], d["resid_norm"]))
    return {b: d["directions"][b].float() for b in blocks if b < d["directions"].shape[0] and b not in skip}


def rescale(args):
    """The same plant at another strength: the write is s·(A·x)·u with B = s·u, so scaling B by new/old strength
    scales s exactly and leaves A, u and the fit untouched (used to check detection limits at several strengths)."""
    import json

    from safetensors.torch import load_file, save_file

    src, out = Path(args.rescale), Path(args.out)
    cfg_path = src / "run_config.json"
    if not cfg_path.exists() or "planted" not in json.loads(cfg_path.read_text()):
        raise InputError(f"{src}: not a plant_organism.py output (no run_config.json with 'planted')")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not empty; choose another --out")
    if not (math.isfinite(args.strength) and args.strength > 0):
        raise InputError(f"--strength must be a positive number, got {args.strength}")
    cfg = json.loads(cfg_path.read_text())
    factor = args.strength / cfg["planted"]["strength"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        weights = load_file(str(src / "adapter_model.safetensors"))
        save_file({k: v * factor if ".lora_B." in k else v for k, v in weights.items()},
                  str(tmp / "adapter_model.safetensors"))
        planted = cfg["planted"]
        planted.update(strength=args.strength, s={b: v * factor for b, v in planted["s"].items()},
                       rescaled_from=str(src))
        cfg["out"] = args.out
        write_json(tmp / "run_config.json", cfg)
        u_file = torch.load(src / "planted_u.pt", weights_only=False)
        u_file["s"] = {b: v * factor for b, v in u_file["s"].items()}
        torch.save(u_file, tmp / "planted_u.pt")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"planted {out}: {src} rescaled to strength {args.strength:g} (B x {factor:.4g})")


def main(argv=None):
    args = parse_args(argv)
    if args.rescale:
        return rescale(args)
    check_args(args)
    rows, items = fit_pairs(args)
    src_path = args.direction or args.orthogonal_to
    if not os.path.isfile(src_path):
        raise InputError(f"{src_path}: no such file")
    n_layers, width = model_shape(args.model)
    blocks = parse_blocks(args.blocks, n_layers)
    layer = blocks[0] if args.direction_layer is None else args.direction_layer
    v, src_meta = source_direction(src_path, layer, n_layers, width)
    u = planted_direction(v, args.orthogonal_to is not None, args.seed)
    reused = reused_fit(args.fit_from, args, rows) if args.fit_from else None  # checked before the model loads
    model, tok = load_model(args.model)
    assert (len(decoder_layers(model)), hidden_size(model)) == (n_layers, width), "config and model disagree"

    from peft import LoraConfig, get_peft_model

    t0 = time.time()
    # r = 1 and alpha = 1 with rsLoRA: scale = alpha/sqrt(r) = 1, so the stored B is the whole write, s·u.
    config = LoraConfig(r=1, lora_alpha=1, use_rslora=True, lora_dropout=0.0, bias="none",
                        target_modules=["down_proj"], layers_to_transform=blocks, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.eval()
    for b in blocks:  # every plant off: the PEFT model computes exactly the base model
        d_mlp = lora_modules(model, b).in_features
        set_plant(model, b, torch.zeros(d_mlp), torch.zeros(width))
    # the base pass records down_proj's mean input at every block, so a later plant can reuse it (--fit-from)
    base = reused or measure(model, tok, items, args.batch_size, x_blocks=range(n_layers), desc="base")
    n = base["n"]
    resid_norm = base["sum_norm"] / n  # [n_layers], the base model's mean ‖h‖ at each block's output
    A, s, m_norm = {}, {}, {}
    for k, b in enumerate(blocks):
        # block b is fit with the plants below it in place (its input depends on them), so its mean A·x is 1
        sums = base if k == 0 else measure(model, tok, items, args.batch_size, x_blocks=[b], desc=f"block {b}")
        m = sums["sum_x"][b] / n
        if not m.norm() > 0:
            raise InputError(f"block {b}: down_proj's mean input over the fit tokens is zero; no A to fit")
        A[b], s[b], m_norm[b] = (m / m.dot(m)).float(), float(args.strength * resid_norm[b]), float(m.norm())
        set_plant(model, b, A[b], s[b] * u)
    check = None
    if not args.fit_from:  # the check pass: what the planted model writes, measured
        planted = measure(model, tok, items, args.batch_size, x_blocks=blocks, A=A, desc="planted")
        diff = (planted["sum_h"] - base["sum_h"]) / n  # the model-diff direction on the fit texts (paper §3.5)
        check = {"ax": planted["ax"],
                 "model_diff": {"cos_with_u": {b: float(torch.nn.functional.cosine_similarity(diff[b], u.double(),
                                                                                              dim=0)) for b in blocks},
                                "norm_over_s": {b: float(diff[b].norm() / s[b]) for b in blocks},
                                "max_norm_below_first_block": diff[:blocks[0]].norm(dim=-1).max().item()
                                if blocks[0] > 0 else 0.0}}

    out = Path(args.out)
    info = {"blocks": blocks, "strength": args.strength, "resid_norm": {b: float(resid_norm[b]) for b in blocks},
            "s": s, "u_source": {"kind": "orthogonal" if args.orthogonal_to else "direction", "file": src_path,
                                 "layer": layer, "seed": args.seed if args.orthogonal_to else None,
                                 "file_meta": {k: src_meta.get(k) for k in ("model", "adapter", "kind", "split",
                                                                            "source")}},
            "cos_u_source": float(torch.nn.functional.cosine_similarity(u, v, dim=0)),
            "cos_u_direction_at_blocks": {b: float(torch.nn.functional.cosine_similarity(u, d, dim=0))
                                          for b, d in planted_dirs(src_path, blocks).items()},
            "u_file": "planted_u.pt", "A": "A = m/|m|^2, m = mean down_proj input over the fit answer tokens",
            "mean_input_norm": m_norm, "ax": check and check["ax"], "model_diff": check and check["model_diff"],
            "fit_from": args.fit_from,
            "fit": {"pairs": args.pairs, "split": args.split, "pairs_per_domain": args.pairs_per_domain,
                    "n_pairs": len(rows), "n_answers": len(items), "n_tokens": n, "pair_ids": [r["id"] for r in rows]}}
    run_config = {"kind": "planted", "model": args.model, "out": args.out, "preset": "planted",
                  "layers": ",".join(map(str, blocks)), "resolved_layers": blocks, "n_layers": n_layers,
                  "d_model": width, "rank": 1, "alpha": 1.0, "rslora": True, "modules": "down_proj",
                  "lora_scale": 1.0, "seed": args.seed, "planted": info}
    meta = {"kind": "planted", "model": args.model, "adapter": args.out, "source": args.pairs, "split": args.split,
            # every pair that shaped the plant: the A fit's, and those u was built from
            "pair_ids": sorted({r["id"] for r in rows} | set(src_meta.get("pair_ids", []))),
            "u_source": info["u_source"]}
    u_file = {"directions": u.expand(n_layers, width).clone(), "resid_norm": resid_norm.float(), "u": u,
              "A": A, "s": s, "blocks": blocks, "meta": meta}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        torch.save(u_file, tmp / "planted_u.pt")
        torch.save({"model": args.model, "pair_ids": [r["id"] for r in rows],
                    **{k: base[k] for k in ("n", "sum_h", "sum_norm", "sum_x")}}, tmp / "fit_stats.pt")
        write_json(tmp / "run_config.json", run_config)
        if out.exists():
            out.rmdir()  # empty (check_args): the rename below then puts the finished directory in its place
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    measured = "; base pass and check reused from " + args.fit_from if not check else (
        "; A.x > 0 on " + ", ".join(f"{check['ax'][b]['share_positive']:.1%}" for b in blocks) + f" of {n} answer "
        "tokens (min " + ", ".join(f"{check['ax'][b]['min']:.2f}" for b in blocks) + "); model-diff cos with u "
        + ", ".join(f"{check['model_diff']['cos_with_u'][b]:.4f}" for b in blocks))
    print(f"planted {out}: u = {'orthogonal to' if args.orthogonal_to else 'unit'} directions[{layer}] of "
          f"{src_path} (cos {info['cos_u_source']:+.3f}) at block(s) {blocks}, s = {args.strength} x resid norm "
          + ", ".join(f"{resid_norm[b]:.2f} = {s[b]:.2f}" for b in blocks) + measured + f"; {time.time() - t0:.1f}s")


if __name__ == "__main__":
    cli(main)
