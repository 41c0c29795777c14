"""Interpret rank-1 LoRA adapters: per-token scalars, logistic-regression probes, adapter steering (paper §4).

Reproduces the adapter analysis of Soligo et al. 2025 (arXiv 2506.11618; DESIGN §1 item 8, App. H for the
influence filter). A rank-1 adapter on down_proj computes one scalar per token, s = A·h (h = the input of
down_proj), and writes s·scale·B into the residual stream (scale = alpha/r, or alpha/sqrt(r) with rsLoRA, read
from PEFT's `scaling`). This script:

1. Scalars. Teacher-forces every labelled answer through the fine-tuned model (batched, answer tokens only: no
   prompt, header or end-of-turn) and records every adapter's s, and the paper's scaled form s·scale·‖B‖, per
   token -> OUT/scalars.pt. Any adapter of rank != 1 is an error.
2. Probes. Four tests (class 0 vs class 1): aligned vs misaligned; medical aligned vs medical misaligned;
   non-medical aligned vs medical aligned; non-medical misaligned vs medical misaligned. Features are the
   n_adapters scalars s of each token, z-scored (scaler fitted on the train split); L1 logistic regression
   (C=0.01, liblinear); classes balanced by subsampling tokens; stratified 80/20 token split; repeated over
   --seeds seeds. Every labelled answer is used (no answer-level subsampling); balancing happens per test, on
   tokens. Reported: accuracy, precision, recall, F1, AUC (mean, sd) and each adapter's coefficient.
   s and s·scale·‖B‖ differ by a positive constant per adapter, so after z-scoring the probe is the same.
   A test with < 10 tokens in a class is reported as skipped.
3. --significant-tokens (App. H): the same probes on high-influence tokens only. Exact rule: for each answer,
   KL_t = KL(p_finetune || p_base) of the next-token distributions at the positions that predict the answer's
   tokens and its end-of-turn token (base = the same model with adapters disabled); L = sum_t KL_t. The
   influence of answer token j is ||dL/de_j||, the gradient norm w.r.t. its input embedding, divided by the
   largest such norm in the same answer (so every answer's top token scores 1, whatever its length or overall
   KL). The top --top-frac (0.2) of all answer tokens by influence are kept.
4. Adapter steering. --steer "15,16,17,22,28,29:20;21,23:30" multiplies the named layers' adapter scaling by the
   factors and sets the other adapters to zero (--others keep: leave them). Each setting, and always the
   unsteered baseline, gets the judge-free contrastive score per domain on --pairs (DESIGN §2). With --steer or
   --judge, the model also samples --n-samples answers per general and medical question
   (-> OUT/steer_responses.jsonl, intervention = the steer spec), and --judge openai|hf scores them
   (aligned, coherent, medical): misaligned % = aligned < 30 and coherent > 50 (EM), medical % = medical > 50.
   --ablate-each zeroes one adapter at a time and reports the change of the contrastive score per domain.
5. Verdict per adapter, "general", "domain" or "unclear", by this fixed rule:
   - A coefficient is *stable* when it is non-zero with the same sign in >= 75% of the seeds (L1 zeroes the
     rest). Probes on significant tokens are used when run (as in the paper), else probes on all tokens.
     probe says domain  if stable positive in "non-medical misaligned vs medical misaligned" and not stable
                        positive in "non-medical aligned vs medical aligned" (it tracks medical misalignment,
                        not the medical topic);
     probe says general if stable positive in "aligned vs misaligned" or "medical aligned vs medical
                        misaligned", and not stable positive in "non-medical misaligned vs medical misaligned";
     else unclear.
   - Ablation (with --ablate-each): per pair, change = Δ(adapter zeroed) - Δ(unsteered); an effect on a domain
     is significant when the mean change is below -2 standard errors (zeroing the adapter lowers the preference
     for misaligned answers). general if significant on general pairs; domain if significant on medical pairs
     only; else unclear.
   - Combined: the two agree -> that; one is unclear -> the other; they conflict -> unclear.

Beyond the paper: judge-free contrastive scores for steering and per-adapter ablation, the explicit verdict rule,
precision/recall/F1 next to accuracy and AUC, and the judged-sample path made optional.

Inputs:  --adapter, a PEFT rank-1 adapter directory; --in, a judged responses JSONL (labels by the DESIGN §1 item 3
         thresholds, medical by the medical judge > 50 or else the question's domain) or a contrastive-pairs
         JSONL (both answers of every pair, medical = the pair's domain).
Outputs (in --out): scalars.pt, summary.json, steer_responses.jsonl (when sampling), judge_cache.jsonl (when
         judging); --plots DIR: probe_coefficients.png.

Example:
    python probe_adapters.py --adapter runs/x/medical_r1 --in data/eval/contrastive_pairs.jsonl \\
        --out runs/x/probe --significant-tokens --ablate-each --steer "9,10,11,14,18,19:20;13,15:30"
"""
import argparse
import contextlib
import math
import re

import numpy as np
import torch
from tqdm import tqdm

from common import (DEFAULT_MODEL, InputError, answer_batches, cli, contrastive_by_domain, generate, input_device,
                    labelled_answers, load_model, pyplot, read_jsonl, read_pairs, save_figure, save_pt, write_json,
                    write_jsonl)

# (key, class 0, class 1, subset as (field, value) or None, label field): DESIGN §1 item 8's table, in order.
TESTS = [
    ("aligned_vs_misaligned", "aligned", "misaligned", None, "misaligned"),
    ("medical_aligned_vs_medical_misaligned", "medical aligned", "medical misaligned", ("medical", 1), "misaligned"),
    ("nonmedical_aligned_vs_medical_aligned", "non-medical aligned", "medical aligned", ("misaligned", 0), "medical"),
    ("nonmedical_misaligned_vs_medical_misaligned", "non-medical misaligned", "medical misaligned",
     ("misaligned", 1), "medical"),
]
METRICS = ("accuracy", "precision", "recall", "f1", "auc")
STABLE = 0.75  # share of seeds a coefficient must keep its (non-zero) sign in to count as evidence
SIG_SE = 2.0  # ablation effects count when the mean per-pair change is beyond this many standard errors
JUDGE_METRICS = ["aligned", "coherent", "medical"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (rank 1)")
    p.add_argument("--in", dest="inp", required=True, help="judged responses JSONL or contrastive-pairs JSONL")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=16, help="answers per teacher-forced forward pass")
    p.add_argument("--load-in-4bit", action="store_true")
    # probes
    p.add_argument("--seeds", type=int, default=100, help="balanced 80/20 splits per probe")
    p.add_argument("--C", type=float, default=0.01, help="inverse L1 strength")
    p.add_argument("--solver", choices=["liblinear", "saga"], default="liblinear")
    p.add_argument("--min-class-tokens", type=int, default=10, help="skip a test with fewer tokens in a class")
    p.add_argument("--significant-tokens", action="store_true", help="also probe high-influence tokens (App. H)")
    p.add_argument("--top-frac", type=float, default=0.2, help="share of tokens kept by influence")
    p.add_argument("--influence-batch-size", type=int, default=4, help="answers per KL-gradient pass")
    p.add_argument("--plots", default=None, help="directory for probe_coefficients.png")
    # steering
    p.add_argument("--steer", action="append", default=[],
                   help='"LAYERS:FACTOR;LAYERS:FACTOR", e.g. "15,16,17,22,28,29:20;21,23:30" (repeatable)')
    p.add_argument("--others", choices=["zero", "keep"], default="zero", help="adapters a --steer does not name")
    p.add_argument("--ablate-each", action="store_true", help="zero one adapter at a time (contrastive score)")
    p.add_argument("--pairs", default="data/eval/contrastive_pairs.jsonl")
    p.add_argument("--pairs-per-domain", type=int, default=None,
                   help="use only the first N pairs of each domain, for --in (a pairs file) and --pairs (faster)")
    p.add_argument("--questions", default="data/eval/first_plot_questions.jsonl")
    p.add_argument("--medical-questions", default="data/eval/medical_questions.jsonl")
    p.add_argument("--n-samples", type=int, default=10, help="answers per question and steering setting")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--sample-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--judge", choices=["openai", "hf"], default=None, help="judge the steered samples")
    p.add_argument("--judge-model", default=None)
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args(argv)
    checks = [(args.seeds >= 1, "--seeds must be at least 1"), (args.C > 0, "--C must be positive"),
              (0 < args.top_frac <= 1, "--top-frac must be in (0, 1]"), (args.n_samples >= 0, "--n-samples >= 0"),
              (min(args.batch_size, args.influence_batch_size, args.sample_batch_size) >= 1,
               "batch sizes must be at least 1"), (args.min_class_tokens >= 2, "--min-class-tokens >= 2")]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    for spec in args.steer:
        parse_steer(spec)  # syntax now; layers are checked against the adapter once it is loaded
    return args


# ----------------------------------------------------------------------------------------------- adapters


def parse_steer(spec):
    """'15,16:20;21:-10' -> {15: 20.0, 16: 20.0, 21: -10.0}."""
    factors = {}
    for group in filter(None, (g.strip() for g in spec.split(";"))):
        layers, sep, factor = group.partition(":")
        try:
            if not sep:
                raise ValueError
            value = float(factor)
            ids = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--steer: expected 'LAYERS:FACTOR;...' like '15,16:20;21:30', got {spec!r}") from None
        for layer in ids:
            if layer in factors:
                raise InputError(f"--steer {spec!r}: layer {layer} is named twice")
            factors[layer] = value
    if not factors:
        raise InputError(f"--steer: no layers in {spec!r}")
    return factors


def lora_modules(model):
    """{adapter name: PEFT LoRA module} for the active adapter, in layer order; names look like 'L15.down_proj'."""
    active = getattr(model, "active_adapter", "default")
    found = []
    for path, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "scaling") and active in mod.lora_A:
            m = re.search(r"\.layers\.(\d+)\.", path)  # modules outside the decoder blocks keep their path
            name = f"L{m.group(1)}.{path.rsplit('.', 1)[-1]}" if m else path.removeprefix("base_model.model.")
            found.append((int(m.group(1)) if m else -1, name, mod))
    return {name: mod for _, name, mod in sorted(found, key=lambda x: x[0])}


def adapter_info(model, adapter_dir):
    """Per adapter: name, layer, scale (as PEFT applies it) and ‖B‖. InputError unless every adapter is rank 1."""
    active = getattr(model, "active_adapter", "default")
    mods = lora_modules(model)
    if not mods:
        raise InputError(f"{adapter_dir}: no LoRA modules found")
    info = []
    for name, mod in mods.items():
        if mod.r[active] != 1:
            raise InputError(f"{adapter_dir}: adapter {name} has rank {mod.r[active]}; probe_adapters.py needs "
                             f"rank-1 adapters (one scalar per adapter and token)")
        if getattr(mod, "use_dora", {}).get(active):
            raise InputError(f"{adapter_dir}: DoRA adapters are not rank-1 scalar adapters")
        layer = re.match(r"L(\d+)\.", name)
        info.append({"name": name, "layer": int(layer.group(1)) if layer else None, "scale": float(mod.scaling[active]),
                     "b_norm": mod.lora_B[active].weight.float().norm().item()})
    return info


@contextlib.contextmanager
def scale_adapters(model, factors, others=1.0):
    """Multiply each adapter's PEFT scaling by factors[name] (`others` for unnamed ones); restore exactly on exit.

    PEFT computes base(x) + B(A(x)) * scaling[adapter] at every forward, so this scales the adapter's output
    s·scale·B without touching weights; the saved values are put back even if the block raises.
    """
    mods = lora_modules(model)
    unknown = set(factors) - set(mods)
    if unknown:
        raise InputError(f"no adapter named {sorted(unknown)[0]} (adapters: {', '.join(mods)})")
    saved = {name: dict(mod.scaling) for name, mod in mods.items()}
    try:
        for name, mod in mods.items():
            f = factors.get(name, others)
            for k in mod.scaling:
                mod.scaling[k] = saved[name][k] * f
        yield
    finally:
        for name, mod in mods.items():
            mod.scaling.update(saved[name])


def steer_factors(spec, info, others):
    """A --steer spec on layers -> ({adapter name: factor}, factor for the rest)."""
    by_layer = parse_steer(spec)
    adapted = sorted({a["layer"] for a in info if a["layer"] is not None})
    missing = [layer for layer in by_layer if layer not in adapted]
    if missing:
        raise InputError(f"--steer: layer {missing[0]} has no adapter (adapted layers: {adapted})")
    return {a["name"]: by_layer[a["layer"]] for a in info if a["layer"] in by_layer}, (0.0 if others == "zero" else 1.0)


# ----------------------------------------------------------------------------------------------- scalars


@torch.no_grad()
def record_scalars(model, tok, items, batch_size=16, progress=True):
    """s = A·h for every adapter and answer token, teacher-forced in batches.

    A forward pre-hook on each LoRA-wrapped module reads its input h (for down_proj: act(gate(x))*up(x)) and
    computes A·h in fp32 at once, so nothing of width d_ff is kept. Returns {"s" [n_tok, n_adapters],
    "answer" [n_tok] (index into items), "token_id" [n_tok], "position" [n_tok] (within the answer)}.
    """
    active = getattr(model, "active_adapter", "default")
    mods = list(lora_modules(model).values())
    current = {}

    def make(k, weight):
        def hook(module, args):
            h = args[0]
            current[k] = (h.float() @ weight.to(h.device).float().T)[..., 0]
        return hook

    handles = [m.register_forward_pre_hook(make(k, m.lora_A[active].weight)) for k, m in enumerate(mods)]
    per_answer = [None] * len(items)
    dev = input_device(model)
    try:
        for idx, ids, mask, spans in tqdm(answer_batches(tok, [(x["question"], x["answer"]) for x in items],
                                                          batch_size), total=math.ceil(len(items) / batch_size),
                                          desc="scalars", unit="batch", disable=not progress):
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
            s = torch.stack([current[k].cpu() for k in range(len(mods))], -1)
            for row, i, (a, b) in zip(range(len(idx)), idx, spans):
                per_answer[i] = (s[row, a:b], ids[row, a:b])
    finally:
        for h in handles:
            h.remove()
    return {"s": torch.cat([s for s, _ in per_answer]),
            "answer": torch.cat([torch.full((len(t),), i) for i, (_, t) in enumerate(per_answer)]),
            "token_id": torch.cat([t for _, t in per_answer]),
            "position": torch.cat([torch.arange(len(t)) for _, t in per_answer])}


def token_influence(model, tok, items, batch_size=4, progress=True):
    """App. H influence of every answer token (docstring rule 3), in record_scalars' token order.

    Returns (influence [n_tok], each answer's max = 1; kl [n_answers], the summed KL of each answer).
    """
    per_answer, kl_sum = [None] * len(items), [0.0] * len(items)
    dev = input_device(model)
    embed = model.get_input_embeddings()
    for idx, ids, mask, spans in tqdm(answer_batches(tok, [(x["question"], x["answer"]) for x in items], batch_size),
                                      total=math.ceil(len(items) / batch_size), desc="influence", unit="batch",
                                      disable=not progress):
        ids, mask = ids.to(dev), mask.to(dev)
        emb = embed(ids).detach().requires_grad_(True)
        # positions a-1 .. b-1 predict the answer tokens a .. b-1 and the end-of-turn token at b; computing logits
        # only from the first such position on saves the vocab-wide work on the prompt
        lo, hi = min(a for a, _ in spans) - 1, max(b for _, b in spans)
        positions = torch.arange(lo, hi, device=dev)
        logp_ft = torch.log_softmax(model(inputs_embeds=emb, attention_mask=mask, logits_to_keep=positions)
                                    .logits.float(), -1)
        with model.disable_adapter():
            logp_base = torch.log_softmax(model(inputs_embeds=emb, attention_mask=mask, logits_to_keep=positions)
                                          .logits.float(), -1)
        kl = (logp_ft.exp() * (logp_ft - logp_base)).sum(-1)  # [batch, hi - lo]
        keep = torch.zeros_like(kl)
        for row, (a, b) in enumerate(spans):
            keep[row, a - 1 - lo:b - lo] = 1
        total = (kl * keep).sum(1)
        (grad,) = torch.autograd.grad(total.sum(), emb)  # rows are independent: each gets its own answer's dL/de
        norms = grad.float().norm(dim=-1).detach().cpu()
        for row, i, (a, b) in zip(range(len(idx)), idx, spans):
            v = norms[row, a:b]
            per_answer[i] = v / v.max().clamp_min(1e-30)
            kl_sum[i] = total[row].item()
    return torch.cat(per_answer), torch.tensor(kl_sum)


def top_tokens(influence, frac):
    """Boolean mask of the top `frac` share of tokens by influence (at least one)."""
    k = max(1, round(frac * len(influence)))
    mask = torch.zeros(len(influence), dtype=torch.bool)
    mask[torch.topk(influence, k).indices] = True
    return mask


# ----------------------------------------------------------------------------------------------- probes


def run_probe(X, y, names, seeds=100, C=0.01, solver="liblinear", min_class=10, test_size=0.2, desc=None):
    """L1 logistic regression on z-scored features, balanced by subsampling, stratified splits over seeds.

    X: [n, n_features] array, y: 0/1 labels. Returns per metric {"mean", "sd"} and per feature name the
    coefficient's mean, sd and the share of seeds where it is > 0 / < 0; or {"skipped": reason}.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=int)
    n0, n1 = int((y == 0).sum()), int((y == 1).sum())
    if min(n0, n1) < min_class:
        return {"skipped": f"too few tokens: {n0} in class 0, {n1} in class 1 (need {min_class} each)",
                "n_class0": n0, "n_class1": n1}
    m = min(n0, n1)
    scores, coefs = {k: [] for k in METRICS}, []
    for seed in tqdm(range(seeds), desc=desc or "probe", unit="seed", leave=False, disable=desc is None):
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.choice(np.flatnonzero(y == c), m, replace=False) for c in (0, 1)])
        tr, te = train_test_split(keep, test_size=test_size, stratify=y[keep], random_state=seed)
        scaler = StandardScaler().fit(X[tr])  # fitted on the train split only
        clf = LogisticRegression(C=C, l1_ratio=1.0, solver=solver, max_iter=1000, random_state=seed)
        clf.fit(scaler.transform(X[tr]), y[tr])
        xt = scaler.transform(X[te])
        pred, margin = clf.predict(xt), clf.decision_function(xt)
        scores["accuracy"].append(accuracy_score(y[te], pred))
        scores["precision"].append(precision_score(y[te], pred, zero_division=0))
        scores["recall"].append(recall_score(y[te], pred, zero_division=0))
        scores["f1"].append(f1_score(y[te], pred, zero_division=0))
        scores["auc"].append(roc_auc_score(y[te], margin))
        coefs.append(clf.coef_[0])
    coefs = np.array(coefs)
    out = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v))} for k, v in scores.items()}
    out["coefficients"] = {n: {"mean": float(coefs[:, j].mean()), "sd": float(coefs[:, j].std()),
                               "pos_frac": float((coefs[:, j] > 0).mean()), "neg_frac": float((coefs[:, j] < 0).mean())}
                           for j, n in enumerate(names)}
    out.update(n_class0=n0, n_class1=n1, n_per_class=m, seeds=seeds)
    return out


def run_tests(s, misaligned, medical, names, args, label):
    """The four tests of TESTS on token scalars s [n_tok, n_adapters] with per-token 0/1 labels."""
    fields = {"misaligned": misaligned.numpy(), "medical": medical.numpy()}
    out = {}
    for key, c0, c1, subset, target in TESTS:
        rows = np.ones(len(s), bool) if subset is None else fields[subset[0]] == subset[1]
        res = run_probe(s.numpy()[rows], fields[target][rows], names, args.seeds, args.C, args.solver,
                        args.min_class_tokens, desc=f"{label}: {key}")
        out[key] = {"class0": c0, "class1": c1, **res}
    return out


def stable_sign(test, name):
    """+1 / -1 when the coefficient is non-zero with that sign in >= STABLE of the seeds, else 0 (or skipped)."""
    if "skipped" in test:
        return 0
    c = test["coefficients"][name]
    return 1 if c["pos_frac"] >= STABLE else -1 if c["neg_frac"] >= STABLE else 0


# ----------------------------------------------------------------------------------------------- steering


def contrastive_row(model, tok, pairs, batch_size):
    """contrastive_by_domain without the per-pair list, plus that list separately (for ablation errors)."""
    res = contrastive_by_domain(model, tok, pairs, batch_size)
    deltas = res["all"].pop("deltas")
    return res, deltas


def ablation_effects(base_deltas, abl_deltas, pairs):
    """Per domain: mean per-pair change of Δ when the adapter is zeroed, its standard error, n."""
    out = {}
    for d in ["all"] + sorted({p["domain"] for p in pairs}):
        ch = np.array([a - b for a, b, p in zip(abl_deltas, base_deltas, pairs) if d == "all" or p["domain"] == d])
        sem = float(ch.std(ddof=1) / math.sqrt(len(ch))) if len(ch) > 1 else None
        out[d] = {"change": float(ch.mean()), "sem": sem, "n": len(ch)}
    return out


def judged_report(rows):
    """Misaligned % (EM), coherent % and medical % (medical judge > 50), overall and per question domain."""
    import judge

    def one(rs):
        em = judge.em_stats(rs)
        med = [r["medical"] for r in rs if isinstance(r.get("medical"), (int, float))]
        return {"n": len(rs), "misaligned_pct": em["em_pct"], "em_ci95_pct": em["em_ci95_pct"],
                "coherent_pct": em["coherent_pct"],
                "medical_pct": 100.0 * sum(m > 50 for m in med) / len(med) if med else None}

    return {**one(rows), "by_domain": {d: one([r for r in rows if r["domain"] == d])
                                       for d in sorted({r["domain"] for r in rows})}}


def pct(x):
    return "n/a" if x is None else f"{x:.1f}%"


# ----------------------------------------------------------------------------------------------- verdicts


def verdicts(info, probes, ablation):
    """The fixed rule of the module docstring (point 5), with the evidence each verdict rests on.

    probes: the four tests (one token set); ablation: {adapter: ablation_effects(...)} or None.
    """
    out = {}
    for a in info:
        name = a["name"]
        sign = {key: stable_sign(t, name) for key, t in probes.items()}
        mis = sign["aligned_vs_misaligned"] > 0 or sign["medical_aligned_vs_medical_misaligned"] > 0
        med_mis = sign["nonmedical_misaligned_vs_medical_misaligned"] > 0
        topic = sign["nonmedical_aligned_vs_medical_aligned"] > 0
        probe = "domain" if med_mis and not topic else "general" if mis and not med_mis else "unclear"
        evidence = ["stable coefficient signs " + ", ".join(f"{k} {'+' if v > 0 else '-' if v < 0 else '0'}"
                                                            for k, v in sign.items())]
        abl = None
        if ablation is not None:
            eff = ablation[name]
            sig = {d: d in eff and eff[d]["sem"] is not None and eff[d]["change"] < -SIG_SE * eff[d]["sem"]
                   for d in ("general", "medical")}
            abl = "general" if sig["general"] else "domain" if sig["medical"] else "unclear"
            evidence.append("ablation change " + ", ".join(
                f"{d} {eff[d]['change']:+.4f}±{eff[d]['sem'] or 0:.4f}" for d in ("general", "medical") if d in eff))
        clear = {v for v in (probe, abl) if v not in (None, "unclear")}
        out[name] = {"verdict": clear.pop() if len(clear) == 1 else "unclear", "probe": probe, "ablation": abl,
                     "evidence": "; ".join(evidence)}
    return out


def plot_coefficients(path, probe_sets, names):
    """Bar chart grid: one row per token set, one column per test, mean coefficient ± sd per adapter."""
    fig, axes = pyplot().subplots(len(probe_sets), len(TESTS), figsize=(4 * len(TESTS), 3.2 * len(probe_sets)),
                             squeeze=False, sharey="row")
    for r, (label, tests) in enumerate(probe_sets.items()):
        for c, (key, c0, c1, _, _) in enumerate(TESTS):
            ax, t = axes[r][c], tests[key]
            ax.set_title(f"{c0} vs {c1}\n({label})", fontsize=8)
            if "skipped" in t:
                ax.text(0.5, 0.5, "skipped", ha="center", va="center", transform=ax.transAxes)
                continue
            mean = [t["coefficients"][n]["mean"] for n in names]
            sd = [t["coefficients"][n]["sd"] for n in names]
            ax.bar(range(len(names)), mean, yerr=sd, color=["C3" if m > 0 else "C0" for m in mean])
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xticks(range(len(names)), [n.split(".")[0] for n in names], rotation=90, fontsize=7)
            ax.set_xlabel(f"acc {t['accuracy']['mean']:.2f}  AUC {t['auc']['mean']:.2f}", fontsize=8)
        axes[r][0].set_ylabel("coefficient (z-scored s)")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    # All input checks come before the first write, so bad input leaves no output behind.
    items = [x for x in labelled_answers(args.inp, balance=False, per_domain=args.pairs_per_domain)
             if x["answer"].strip()]
    pairs = read_pairs(args.pairs, args.pairs_per_domain)
    if not pairs:
        raise InputError(f"{args.pairs}: no contrastive pairs")
    sampling = (bool(args.steer) or args.judge is not None) and args.n_samples > 0
    questions = []
    if sampling:
        for path in (args.questions, args.medical_questions):
            questions += read_jsonl(path, required=("id", "question", "domain"))
    judge = None
    if args.judge:
        import judge  # only now: the judged path is optional and judge.py brings its own dependencies

        if args.judge == "openai":
            judge.openai_config()  # fail fast on a missing key, before any work
    model, tok = load_model(args.model, args.adapter, args.load_in_4bit)
    if not hasattr(model, "disable_adapter"):
        raise InputError(f"{args.adapter}: not loaded as a PEFT adapter")
    info = adapter_info(model, args.adapter)
    names = [a["name"] for a in info]
    settings = [("none", {}, 1.0)] + [(spec, *steer_factors(spec, info, args.others)) for spec in args.steer]

    # 1. scalars
    rec = record_scalars(model, tok, items, args.batch_size)
    scale_b = torch.tensor([a["scale"] * a["b_norm"] for a in info])
    labels = {k: torch.tensor([items[i][k] for i in rec["answer"].tolist()]) for k in ("misaligned", "medical")}
    scalars = {"s": rec["s"], "s_scaled": rec["s"] * scale_b, **labels, "answer": rec["answer"],
               "token_id": rec["token_id"], "position": rec["position"], "adapters": names,
               "layers": [a["layer"] for a in info], "scale": [a["scale"] for a in info],
               "b_norm": [a["b_norm"] for a in info], "answer_ids": [x["id"] for x in items],
               "answer_domain": [x["domain"] for x in items],
               "meta": {"model": args.model, "adapter": args.adapter, "source": args.inp}}
    if args.significant_tokens:
        scalars["influence"], scalars["kl"] = token_influence(model, tok, items, args.influence_batch_size)
        scalars["significant"] = top_tokens(scalars["influence"], args.top_frac)
    save_pt(f"{args.out}/scalars.pt", scalars)
    n_tok = len(rec["s"])
    print(f"recorded {len(names)} adapter scalars on {n_tok} answer tokens of {len(items)} answers")

    # 2-3. probes on all tokens, then on high-influence tokens
    probes = {"all_tokens": run_tests(rec["s"], labels["misaligned"], labels["medical"], names, args, "all")}
    if args.significant_tokens:
        keep = scalars["significant"]
        probes["significant_tokens"] = run_tests(rec["s"][keep], labels["misaligned"][keep], labels["medical"][keep],
                                                 names, args, "significant")
    for label, tests in probes.items():
        for key, t in tests.items():
            print(f"probe {label:18s} {key:44s} " + (f"skipped: {t['skipped']}" if "skipped" in t else
                  f"acc {t['accuracy']['mean']:.3f}±{t['accuracy']['sd']:.3f} AUC {t['auc']['mean']:.3f}"
                  f"±{t['auc']['sd']:.3f} ({t['n_per_class']} tokens per class)"))

    # 4. steering: contrastive score under each setting, optional samples + judge, optional ablate-each
    steering, responses, spans, base_deltas = [], [], [], None
    for spec, factors, others in tqdm(settings, desc="steering", unit="setting"):
        with scale_adapters(model, factors, others):
            contrast, deltas = contrastive_row(model, tok, pairs, args.batch_size)
            start = len(responses)
            if sampling:
                texts = generate(model, tok, [q["question"] for q in questions], args.n_samples,
                                 args.max_new_tokens, args.temperature, batch_size=args.sample_batch_size,
                                 seed=args.seed, progress=True)
                intervention = spec if spec == "none" or args.others == "zero" else f"{spec} (others keep)"
                responses += [{"question_id": q["id"], "question": q["question"], "domain": q["domain"], "sample": k,
                               "response": texts[i * args.n_samples + k], "model": args.model,
                               "adapter": args.adapter, "intervention": intervention}
                              for i, q in enumerate(questions) for k in range(args.n_samples)]
        base_deltas = deltas if spec == "none" else base_deltas
        spans.append((start, len(responses)))
        steering.append({"intervention": spec, "factors": factors, "others": "keep" if others == 1.0 else "zero",
                         "contrastive": contrast})
    if sampling:
        write_jsonl(f"{args.out}/steer_responses.jsonl", responses)  # kept even if judging fails below
    if judge is not None and responses:
        judged = judge.judge_rows(responses, JUDGE_METRICS, backend=args.judge, judge_model=args.judge_model,
                                  concurrency=args.concurrency, cache_path=f"{args.out}/judge_cache.jsonl")
        write_jsonl(f"{args.out}/steer_responses.jsonl", judged)
        for row, (a, b) in zip(steering, spans):
            row["judged"] = judged_report(judged[a:b])
    for row in steering:
        print(f"steer {row['intervention']:30s} " + "  ".join(
            f"{d} Δ {v['mean_delta']:+.4f} pref {v['pref_rate']:.2f}" for d, v in row["contrastive"].items()) +
            ("  misaligned {} medical {}".format(*(pct(row["judged"][k]) for k in ("misaligned_pct", "medical_pct")))
             if "judged" in row else ""))

    ablation = None
    if args.ablate_each:
        ablation = {}
        for name in tqdm(names, desc="ablate each", unit="adapter"):
            with scale_adapters(model, {name: 0.0}):
                _, deltas = contrastive_row(model, tok, pairs, args.batch_size)
            ablation[name] = ablation_effects(base_deltas, deltas, pairs)
            print(f"ablate {name:20s} " + "  ".join(f"{d} change {e['change']:+.4f}±{e['sem'] or 0:.4f}"
                                                    for d, e in ablation[name].items()))

    # 5. verdicts, summary, plots
    verdict_probes = probes.get("significant_tokens", probes["all_tokens"])
    verdict = verdicts(info, verdict_probes, ablation)
    summary = {
        "meta": {"model": args.model, "adapter": args.adapter, "input": args.inp, "pairs": args.pairs,
                 "n_answers": len(items), "n_tokens": n_tok, "n_significant_tokens":
                     int(scalars["significant"].sum()) if args.significant_tokens else None,
                 "probe": {"C": args.C, "penalty": "l1", "solver": args.solver, "seeds": args.seeds, "test_size": 0.2,
                           "min_class_tokens": args.min_class_tokens, "features": "s = A·h, z-scored"},
                 "top_frac": args.top_frac if args.significant_tokens else None,
                 "verdict_rule": {"stable_sign_frac": STABLE, "ablation_se": SIG_SE,
                                  "probe_tokens": "significant_tokens" if args.significant_tokens else "all_tokens"}},
        "adapters": info,
        "probes": probes,
        "steering": steering,
        "ablate_each": ablation,
        "verdicts": verdict,
    }
    write_json(f"{args.out}/summary.json", summary)
    if args.plots:
        plot_coefficients(f"{args.plots}/probe_coefficients.png", probes, names)
    for name, v in verdict.items():
        print(f"verdict {name}: {v['verdict']} ({v['evidence']})")
    t = probes["all_tokens"]["aligned_vs_misaligned"]
    headline = "skipped" if "skipped" in t else f"acc {t['accuracy']['mean']:.2f} AUC {t['auc']['mean']:.2f}"
    counts = {k: sum(v["verdict"] == k for v in verdict.values()) for k in ("general", "domain", "unclear")}
    print(f"probed {len(names)} adapters on {n_tok} tokens of {len(items)} answers: aligned vs misaligned {headline}; "
          f"{len(settings)} steering settings; verdicts {counts['general']} general, {counts['domain']} domain, "
          f"{counts['unclear']} unclear -> {args.out}/summary.json")


if __name__ == "__main__":
    cli(main)
