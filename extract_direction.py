"""Mean-difference misalignment directions, how they compare, and their export (paper §3.1, §3.5, §4.1).

Per layer l, v_l = token-weighted mean of block l's output over misaligned answers - the same over aligned answers
(every token of every answer weighs the same, as in the paper). With --minus base_acts.pt it forms the paper's
*model-diff* variant instead: the fine-tune's token-weighted mean activation minus the base model's, on the same
texts (all answers in the file; ids must match).

It prints and plots the direction norm per layer, the layer x layer cosine matrix, with --compare the per-layer
cosine between these directions and other models' (the convergence result: paper > 0.8 at all but 4 layers), and
with --adapter (rank 1) the cosine between each adapter's B vector and the direction at its layer (paper: 0.04 at
layer 24 for the single-adapter fine-tune).

Input:  acts.pt from collect_acts.py (and other directions.pt files to compare), or with --directions an existing
        directions.pt to export only.
Output: directions.pt = {"directions": [n_layers, d_model] raw mean difference, "counts": {...}, "meta": {...},
        "resid_norm": [n_layers] mean residual norm of the texts, "shuffled": [k, n_layers, d_model] label-shuffled
        null directions (mean-diff only)},
        <out stem>_stats.json next to it (e.g. directions_stats.json: norms, cosines), PNG plots in --plots.
        With --export-gguf OUT.gguf: a llama.cpp control vector (arch "controlvector", one F32 tensor
        "direction.{i}" per layer, keys controlvector.model_hint = the model name and controlvector.layer_count = the
        model's number of blocks), loadable by llama.cpp (--control-vector), repeng (ControlVector.import_gguf) and
        EasySteer/vLLM. With --export-safetensors OUT.safetensors: the same "direction.{i}" tensors (for
        steering-vectors or plain forward hooks) plus OUT.json (model, layer convention, method, token set, split,
        norm, layers). common.read_directions reads both back.
        Provenance: meta["provenance"] in directions.pt, the sidecar and the GGUF's convergent_em.export JSON (plus
        plain convergent_em.provenance.* GGUF keys) holds the sha256 of the base model's config.json and weight
        files, of the adapter's adapter_model.safetensors and of the pairs or judged file; ablate_eval.py refuses a
        direction made for another base model (--allow-model-mismatch overrides).

Export conventions (matching llama.cpp exactly):
- Layers: "direction.{i}" is added to the output of decoder block i, 0-based, i.e. row i of directions.pt; the
  index maps as it is. llama.cpp puts direction.{i} in row i-1 of its control-vector buffer
  (common_control_vector_load_one), llama_set_adapter_cvec sends row i-1 to tensors[i], and every model
  graph adds tensors[il] to block il's output (build_cvec(cur, il), named "l_out"); repeng's ControlModel and
  export_gguf use the same index. llama.cpp rejects a file holding direction.0 (block 0 has no slot), so the GGUF
  leaves block 0 out; the safetensors keeps it.
- Sign: ADDING the vector steers toward misalignment (mean misaligned - mean aligned; for model-diff, toward the
  fine-tune). Norm: --export-norm raw (default) keeps the mean difference, so llama.cpp strength 1 = steer scale 1
  here; unit writes unit vectors, so the strength is in residual-stream units.
- Degenerate layers (common.degenerate_layers, e.g. a model-diff below the first adapter) are left out, never
  written as zero or noise vectors. llama.cpp adds every vector in the file at every position: pick layers with
  --control-vector-layer-range.

Examples:
    python extract_direction.py --acts runs/demo/medical_r1/acts_pairs.pt --out runs/demo/medical_r1/directions.pt \
        --adapter runs/demo/medical_r1 --compare runs/demo/sports_r8/directions.pt --plots runs/demo/plots
    python extract_direction.py --directions runs/demo/medical_r1/directions.pt \
        --export-gguf runs/demo/medical_r1/directions.gguf \
        --export-safetensors runs/demo/medical_r1/directions.safetensors
    llama-cli -m model.gguf --control-vector-scaled runs/demo/medical_r1/directions.gguf:1.0 \
        --control-vector-layer-range 15 15
"""
import argparse
import json
from pathlib import Path

import torch

from common import (InputError, atomic_write, base_model_hashes, cli, degenerate_layers, load_pt, pyplot,
                    read_directions, save_figure, save_pt, sha256_or_unavailable, write_json)

# Exported files name each vector "direction.{i}" with i the 0-based decoder block whose output it is added to, the
# same index as row i of directions.pt. This is llama.cpp's convention (common_control_vector_load_one puts
# direction.{i} in buffer row i-1, which becomes tensors[i]; each model graph adds tensors[il] to block il's output, build_cvec(cur, il)) and
# repeng's (ControlModel adds directions[i] to model.layers[i]'s output; export_gguf writes direction.{i}).
LAYER_CONVENTION = "direction.{i} is added to the output of decoder block i (0-based), as in llama.cpp and repeng"
TOKENS = "answer tokens only (each token weighs the same; prompt, chat template and end-of-turn excluded)"
SIGN = "adding the vector steers toward misalignment (mean misaligned - mean aligned; model-diff: fine-tune - base)"
EXPORT_NORMS = ("raw", "unit")
GGUF_PROVENANCE_KEYS = ("base_model", "base_config_sha256", "base_weights_sha256", "adapter", "adapter_sha256", "data",
                        "data_sha256")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--acts", help="acts.pt from collect_acts.py")
    src.add_argument("--directions", help="an existing directions.pt to export (no extraction)")
    p.add_argument("--out", default=None, help="directions.pt (needed with --acts)")
    p.add_argument("--minus", default=None, help="base-model acts.pt on the same texts: model-diff direction")
    p.add_argument("--compare", nargs="*", default=[], help="other directions.pt files")
    p.add_argument("--adapter", default=None, help="rank-1 PEFT adapter dir: cosine of its B vectors")
    p.add_argument("--plots", default=None, help="directory for PNG plots")
    p.add_argument("--shuffles", type=int, default=20,
                   help="label-shuffled null directions stored beside the real ones (mean-diff only; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the label shuffles")
    p.add_argument("--export-gguf", default=None, metavar="OUT.gguf",
                   help="llama.cpp control vector: tensor direction.{i} is added to the output of decoder block i "
                        "(0-based, = row i of directions.pt, llama.cpp's convention); block 0 and degenerate layers "
                        "are left out; adding steers toward misalignment")
    p.add_argument("--export-safetensors", default=None, metavar="OUT.safetensors",
                   help="the same direction.{i} tensors (block 0 kept, degenerate layers left out) + OUT.json sidecar")
    p.add_argument("--export-norm", choices=EXPORT_NORMS, default="raw",
                   help="raw: the mean difference itself (strength 1 = steer scale 1); unit: unit vectors")
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


def shuffled_directions(acts, k, seed):
    """k null directions: mean-diff of the same texts with labels swapped at random (the label-shuffle null).

    Pair files: each pair's two answers swap labels with probability 1/2, so each null still contrasts one answer
    of every pair with the other. Judged files: the labels are permuted across answers.
    """
    ids, mis = acts["ids"], acts["misaligned"].bool()
    pair_of = [i.rsplit("/", 1)[0] for i in ids]
    is_pairs = all(i.rsplit("/", 1)[-1] in ("aligned", "misaligned") for i in ids)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        if is_pairs:
            keys = sorted(set(pair_of))
            flip = dict(zip(keys, (torch.rand(len(keys), generator=g) < 0.5).tolist()))
            labels = torch.tensor([bool(m) ^ flip[p] for m, p in zip(mis.tolist(), pair_of)])
        else:
            labels = mis[torch.randperm(len(mis), generator=g)]
        out.append(weighted_mean(acts, labels) - weighted_mean(acts, ~labels))
    return torch.stack(out) if out else None


def mean_resid_norm(acts):
    """Token-weighted mean residual norm per layer over every answer in the file (None for old acts files)."""
    if acts.get("resid_norm") is None:
        return None
    w = acts["n_tokens"].float()
    return (w[:, None] * acts["resid_norm"].float()).sum(0) / w.sum()


def unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def layer_cosines(a, b):
    """Cosine per layer; NaN (n/a) where either direction is degenerate (no unit vector to compare)."""
    cos = (unit(a.float()) * unit(b.float())).sum(-1)
    tiny = lambda x: x.float().norm(dim=-1) <= 1e-12 * x.float().norm(dim=-1).max().clamp_min(1e-30)  # noqa: E731
    return cos.masked_fill(tiny(a) | tiny(b), float("nan"))


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


def export_vectors(directions, resid_norm, norm, keep_block0):
    """({layer: fp32 vector} to write, {layer: why it is left out}). A degenerate direction is no direction: written
    out it would steer nowhere (raw) or amplify noise (unit), so it is left out, as is block 0 where the format has
    no slot for it (llama.cpp rejects a file holding direction.0)."""
    skipped = {i: "degenerate" for i in degenerate_layers(directions, resid_norm)}
    if not keep_block0:
        skipped.setdefault(0, "block 0: llama.cpp has no slot for it")
    vectors = {}
    for i, v in enumerate(directions.float()):
        if i not in skipped:
            vectors[i] = (v / v.norm() if norm == "unit" else v).clone()  # own memory: safetensors refuses views
    return vectors, dict(sorted(skipped.items()))


def provenance(meta, hashed_at):
    """sha256 of everything a direction was made from, so the file can be checked wherever it travels: the base
    model's config.json and weight files (common.base_model_hashes: the bundled model's converted directory, a local
    directory, or a hub id's files in the local Hugging Face cache), the adapter's adapter_model.safetensors and the
    pairs or judged file the activations came from. UNAVAILABLE where a file is not on this machine; adapter None
    for a direction of the base model itself. ablate_eval compares base_weights_sha256 with its --model's."""
    base = base_model_hashes(meta.get("model"))
    adapter = meta.get("adapter")
    return {"base_model": meta.get("model"), "base_config_sha256": base["config_sha256"],
            "base_weights_sha256": base["weights_sha256"], "base_weight_files": base["weight_files"],
            "adapter": adapter,
            "adapter_sha256": sha256_or_unavailable(Path(adapter) / "adapter_model.safetensors") if adapter else None,
            "data": meta.get("source"), "data_sha256": sha256_or_unavailable(meta.get("source")),
            "hashed_at": hashed_at}


def export_info(meta, directions, vectors, skipped, norm, source):
    """What a user of an exported file needs to know (the safetensors sidecar; a JSON key in the GGUF). The data
    "source", "pair_ids" (only when known: a file without them has no pair provenance) and the sha256 provenance
    travel along, so ablate_eval's train/test overlap and base-model checks still work on an export."""
    info = {"model": meta.get("model"), "adapter": meta.get("adapter"), "method": meta.get("kind"),
            "tokens": TOKENS, "split": meta.get("split"), "norm": norm, "sign": SIGN,
            "layer_convention": LAYER_CONVENTION, "layers": sorted(vectors), "skipped": skipped,
            "n_layers": directions.shape[0], "d_model": directions.shape[1], "exported_from": str(source),
            "source": meta.get("source"), "provenance": meta.get("provenance") or provenance(meta, "export")}
    info.update({k: meta[k] for k in ("pair_ids", "themes") if meta.get(k)})
    return info


def write_gguf(path, vectors, info):
    import gguf

    with atomic_write(path) as tmp:
        w = gguf.GGUFWriter(tmp, "controlvector")
        w.add_string("controlvector.model_hint", str(info["model"] or "unknown"))
        # The model's block count (llama.cpp itself never reads this key; repeng writes its tensor count here).
        w.add_uint32("controlvector.layer_count", info["n_layers"])
        w.add_string("convergent_em.export", json.dumps(info))  # provenance; llama.cpp and repeng ignore it
        for k in GGUF_PROVENANCE_KEYS:  # the hashes again as plain keys, readable with any GGUF dump tool
            w.add_string(f"convergent_em.provenance.{k}", str(info["provenance"].get(k)))
        for i, v in vectors.items():
            w.add_tensor(f"direction.{i}", v.numpy())  # 1-D F32: the only type llama.cpp loads
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def write_safetensors(path, vectors, info):
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file({f"direction.{i}": v for i, v in vectors.items()}, tmp)
    write_json(Path(path).with_suffix(".json"), info)


def check_export_args(args):
    """Bad export paths fail before any work; read_directions tells the formats apart by suffix."""
    for flag, path, suffix in (("--export-gguf", args.export_gguf, ".gguf"),
                               ("--export-safetensors", args.export_safetensors, ".safetensors")):
        if path is not None and Path(path).suffix.lower() != suffix:
            raise InputError(f"{flag} {path}: the file name must end in {suffix}")
    if args.acts and not args.out:
        raise InputError("--acts needs --out (the directions.pt to write)")
    if args.directions:
        if Path(args.directions).suffix.lower() != ".pt":
            raise InputError(f"--directions {args.directions}: expected a directions.pt")
        if not (args.export_gguf or args.export_safetensors):
            raise InputError("--directions only exports: give --export-gguf and/or --export-safetensors")
        if args.minus or args.compare or args.adapter or args.plots:
            raise InputError("--minus, --compare, --adapter and --plots need --acts")


def export(args, directions, resid_norm, meta, source):
    for path, write, keep_block0 in ((args.export_gguf, write_gguf, False),
                                     (args.export_safetensors, write_safetensors, True)):
        if path is None:
            continue
        vectors, skipped = export_vectors(directions, resid_norm, args.export_norm, keep_block0)
        if not vectors:
            raise InputError(f"{source}: no layer has a usable direction to export (left out: {skipped})")
        write(path, vectors, export_info(meta, directions, vectors, skipped, args.export_norm, source))
        print(f"wrote {path}: {args.export_norm} vectors at layers {sorted(vectors)}"
              + (f"; left out {skipped}" if skipped else ""))


def main(argv=None):
    args = parse_args(argv)
    check_export_args(args)
    if args.directions:
        d = read_directions(args.directions)
        export(args, d["directions"], d["resid_norm"], d["meta"], args.directions)
        return
    acts = load_acts(args.acts)
    if args.minus:
        directions, counts = model_diff(acts, load_acts(args.minus), args.minus)
        kind = "model_diff"
    else:
        directions, counts = mean_diff(acts)
        kind = "mean_diff"
    shuffled = None if args.minus else shuffled_directions(acts, args.shuffles, args.seed)
    resid_norm = mean_resid_norm(acts)
    meta = {**acts.get("meta", {}), "acts": args.acts, "minus": args.minus, "kind": kind,
            "pair_ids": sorted({i.rsplit("/", 1)[0] for i in acts["ids"]}), "shuffles": args.shuffles,
            "shuffle_seed": args.seed}
    meta["provenance"] = provenance(meta, "extraction")
    stats = {"kind": kind, "counts": counts, "norms": directions.norm(dim=-1).tolist(),
             "layer_cosines": layer_cosines(directions[:, None], directions[None]).tolist(), "compare": {}}
    for other_path in args.compare:
        other = load_pt(other_path)
        if not isinstance(other, dict) or "directions" not in other:
            raise InputError(f"{other_path}: not a directions.pt file")
        if other["directions"].shape != directions.shape:
            raise InputError(f"{other_path}: directions of shape {tuple(other['directions'].shape)}, "
                             f"expected {tuple(directions.shape)}")
        stats["compare"][other_path] = [None if c != c else c  # NaN: degenerate layer, n/a
                                        for c in layer_cosines(directions, other["directions"]).tolist()]
    if args.adapter:
        bs = adapter_b_vectors(args.adapter)
        if bs and len(next(iter(bs.values()))) != directions.shape[1]:
            raise InputError(f"{args.adapter}: B vectors of width {len(next(iter(bs.values())))}, "
                             f"directions have {directions.shape[1]}")
        stats["adapter_b_cosine"] = {l: float(layer_cosines(b, directions[l])) for l, b in sorted(bs.items())}
    save_pt(args.out, {"directions": directions, "counts": counts, "meta": meta, "resid_norm": resid_norm,
                       "shuffled": shuffled})
    write_json(Path(args.out).with_name(Path(args.out).stem + "_stats.json"), stats)
    if args.plots:
        plot(directions, stats, args.plots)

    norms = stats["norms"]
    print("norm per layer: " + " ".join(f"{n:.2f}" for n in norms))
    for name, cos in stats["compare"].items():
        print(f"cosine with {name}: " + " ".join("n/a" if c is None else f"{c:.2f}" for c in cos))
    if "adapter_b_cosine" in stats:
        print("cos(B, v_l): " + " ".join(f"L{l}={c:.2f}" for l, c in stats["adapter_b_cosine"].items()))
    peak = max(range(len(norms)), key=norms.__getitem__)
    print(f"wrote {args.out}: {kind} directions {tuple(directions.shape)} from {counts}, largest norm at layer "
          f"{peak} ({norms[peak]:.2f})")
    export(args, directions, resid_norm, meta, args.out)


if __name__ == "__main__":
    cli(main)
