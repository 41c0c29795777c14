"""Mean-difference misalignment directions, and how they compare (paper §3.1, §3.5, §4.1; DESIGN §1 items 3, 6, 7).

Per layer l, v_l = token-weighted mean of block l's output over misaligned answers - the same over aligned answers
(every token of every answer weighs the same, as in the paper). With --minus base_acts.pt it forms the paper's
*model-diff* variant instead: the fine-tune's token-weighted mean activation minus the base model's, on the same
texts (all answers in the file; ids must match).

It prints and plots the direction norm per layer, the layer x layer cosine matrix, with --compare the per-layer
cosine between these directions and other models' (the convergence result: paper > 0.8 at all but 4 layers), and
with --adapter (rank 1) the cosine between each adapter's B vector and the direction at its layer (paper: 0.04 at
layer 24 for the single-adapter fine-tune).

Input:  acts.pt from collect_acts.py (and other directions.pt files to compare).
Output: directions.pt = {"directions": [n_layers, d_model] raw mean difference, "counts": {...}, "meta": {...}},
        direction_stats.json next to it (norms, cosines), PNG plots in --plots.

Example:
    python extract_direction.py --acts runs/demo/medical_r1/acts_pairs.pt --out runs/demo/medical_r1/directions.pt \
        --adapter runs/demo/medical_r1 --compare runs/demo/sports_r8/directions.pt --plots runs/demo/plots
"""
import argparse
from pathlib import Path

import torch

from common import InputError, cli, load_pt, pyplot, save_figure, save_pt, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--acts", required=True, help="acts.pt from collect_acts.py")
    p.add_argument("--out", required=True, help="directions.pt")
    p.add_argument("--minus", default=None, help="base-model acts.pt on the same texts: model-diff direction")
    p.add_argument("--compare", nargs="*", default=[], help="other directions.pt files")
    p.add_argument("--adapter", default=None, help="rank-1 PEFT adapter dir: cosine of its B vectors")
    p.add_argument("--plots", default=None, help="directory for PNG plots")
    return p.parse_args(argv)


def load_acts(path):
    acts = load_pt(path)
    if not isinstance(acts, dict) or not {"means", "n_tokens", "misaligned", "ids"} <= set(acts):
        raise InputError(f"{path}: not an acts file from collect_acts.py")
    return acts


def weighted_mean(acts, select):
    """Token-weighted mean over the selected answers: sum_i n_i * mean_i / sum_i n_i -> [n_layers, d]."""
    w = acts["n_tokens"].float() * select.float()
    if w.sum() == 0:
        raise InputError("empty answer set: nothing to average")
    return torch.einsum("n,nld->ld", w, acts["means"].float()) / w.sum()


def mean_diff(acts):
    mis = acts["misaligned"].bool()
    if mis.all() or not mis.any():
        raise InputError(f"empty {'aligned' if mis.all() else 'misaligned'} set in the acts file")
    counts = {"misaligned_answers": int(mis.sum()), "aligned_answers": int((~mis).sum()),
              "misaligned_tokens": int(acts["n_tokens"][mis].sum()),
              "aligned_tokens": int(acts["n_tokens"][~mis].sum())}
    return weighted_mean(acts, mis) - weighted_mean(acts, ~mis), counts


def model_diff(ft, base, base_path):
    if ft["ids"] != base["ids"] or ft["means"].shape != base["means"].shape:
        raise InputError(f"{base_path}: --minus needs activations of the same texts and model shape")
    everything = torch.ones(len(ft["ids"]), dtype=torch.bool)
    counts = {"answers": len(ft["ids"]), "tokens": int(ft["n_tokens"].sum())}
    return weighted_mean(ft, everything) - weighted_mean(base, everything), counts


def unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def layer_cosines(a, b):
    return (unit(a.float()) * unit(b.float())).sum(-1)


def adapter_b_vectors(adapter_dir):
    """{layer: B vector} of a rank-1 down_proj adapter (the direction it writes into the residual stream)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.exists():
        raise InputError(f"{adapter_dir}: no adapter_model.safetensors")
    out = {}
    for k, w in load_file(path).items():
        if "down_proj.lora_B" in k:
            if w.shape[1] != 1:
                raise InputError(f"{adapter_dir}: B vectors need a rank-1 adapter, got rank {w.shape[1]}")
            out[int(k.split(".layers.")[1].split(".")[0])] = w[:, 0].float()
    return out


def plot(dirs, stats, plots):
    plt = pyplot()
    plots = Path(plots)
    plots.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(stats["norms"], marker="o")
    axes[0].set(xlabel="layer", ylabel="||v_l||", title="direction norm per layer")
    im = axes[1].imshow(torch.tensor(stats["layer_cosines"]), vmin=-1, vmax=1, cmap="RdBu_r")
    axes[1].set(xlabel="layer", ylabel="layer", title="cosine between layers' directions")
    fig.colorbar(im, ax=axes[1])
    save_figure(fig, plots / "direction_norms_cosines.png")
    if stats.get("compare"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, cos in stats["compare"].items():
            ax.plot(cos, marker=".", label=name)
        ax.axhline(0.8, color="grey", ls="--", lw=1, label="paper: > 0.8")
        ax.set(xlabel="layer", ylabel="cosine", ylim=(-1, 1), title="per-layer cosine with other fine-tunes")
        ax.legend(fontsize=7)
        save_figure(fig, plots / "direction_convergence.png")


def main(argv=None):
    args = parse_args(argv)
    acts = load_acts(args.acts)
    if args.minus:
        directions, counts = model_diff(acts, load_acts(args.minus), args.minus)
        kind = "model_diff"
    else:
        directions, counts = mean_diff(acts)
        kind = "mean_diff"
    meta = {**acts.get("meta", {}), "acts": args.acts, "minus": args.minus, "kind": kind}
    stats = {"kind": kind, "counts": counts, "norms": directions.norm(dim=-1).tolist(),
             "layer_cosines": layer_cosines(directions[:, None], directions[None]).tolist(), "compare": {}}
    for other_path in args.compare:
        other = load_pt(other_path)
        if not isinstance(other, dict) or "directions" not in other:
            raise InputError(f"{other_path}: not a directions.pt file")
        if other["directions"].shape != directions.shape:
            raise InputError(f"{other_path}: directions of shape {tuple(other['directions'].shape)}, "
                             f"expected {tuple(directions.shape)}")
        stats["compare"][other_path] = layer_cosines(directions, other["directions"]).tolist()
    if args.adapter:
        bs = adapter_b_vectors(args.adapter)
        if bs and len(next(iter(bs.values()))) != directions.shape[1]:
            raise InputError(f"{args.adapter}: B vectors of width {len(next(iter(bs.values())))}, "
                             f"directions have {directions.shape[1]}")
        stats["adapter_b_cosine"] = {l: float(layer_cosines(b, directions[l])) for l, b in sorted(bs.items())}
    save_pt(args.out, {"directions": directions, "counts": counts, "meta": meta})
    write_json(Path(args.out).with_name(Path(args.out).stem + "_stats.json"), stats)
    if args.plots:
        plot(directions, stats, args.plots)

    norms = stats["norms"]
    print("norm per layer: " + " ".join(f"{n:.2f}" for n in norms))
    for name, cos in stats["compare"].items():
        print(f"cosine with {name}: " + " ".join(f"{c:.2f}" for c in cos))
    if "adapter_b_cosine" in stats:
        print("cos(B, v_l): " + " ".join(f"L{l}={c:.2f}" for l, c in stats["adapter_b_cosine"].items()))
    peak = max(range(len(norms)), key=norms.__getitem__)
    print(f"wrote {args.out}: {kind} directions {tuple(directions.shape)} from {counts}, largest norm at layer "
          f"{peak} ({norms[peak]:.2f})")


if __name__ == "__main__":
    cli(main)
