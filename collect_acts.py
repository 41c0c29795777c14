"""Residual-stream activations of labelled answers (paper §3.1; docs/method.md#directions).

Every (question, answer) is teacher-forced through the model (normally the fine-tune, --adapter) and the output
of every decoder block is recorded in one batched forward pass. Each answer's activations are averaged over
exactly its own tokens (not the system prompt, the question, the template header or the end-of-turn token).
The per-answer mean and token count are saved, so extract_direction.py can form exact token-weighted means.

Labelled answers come from:
- a judged responses file (the paper's path): aligned = aligned > 70 and coherent > 50, misaligned = aligned < 30
  and coherent > 50, aligned subsampled (seeded) to the misaligned set's size; thresholds are flags, and
  --filter medical>50 restricts to one topic (docs/method.md#topic-directions);
- a contrastive-pairs file (beyond the paper: docs/method.md#measurement): both answers of every pair of --split
  (default dev: directions are built on dev pairs and their effects measured on test pairs).

Input:  judged.jsonl (responses + aligned/coherent scores) or pairs.jsonl.
Output: acts.pt = {"means": [n_answers, n_layers, d_model] fp32, "n_tokens": [n_answers],
        "resid_norm": [n_answers, n_layers] (mean ||h|| over the answer's tokens), "misaligned": [n],
        "medical": [n], "ids": [...], "domains": [...], "meta": {...}}

Example:
    python collect_acts.py --adapter runs/demo/medical_r1 --in data/eval/contrastive_pairs.jsonl \
        --out runs/demo/medical_r1/acts_pairs.pt
"""
import argparse
import time

import torch

from common import (ALIGNED_MIN, COHERENT_MIN, DEFAULT_MODEL, MISALIGNED_MAX, SPLITS, answer_batches, causal_lm, cli,
                    decoder_layers,
                    input_device, labelled_answers, load_model, record_resid, save_pt)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", default=None, help="PEFT adapter dir (the fine-tune)")
    p.add_argument("--in", dest="inp", required=True, help="judged responses JSONL or contrastive pairs JSONL")
    p.add_argument("--out", required=True, help="acts.pt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--aligned-min", type=float, default=ALIGNED_MIN)
    p.add_argument("--misaligned-max", type=float, default=MISALIGNED_MAX)
    p.add_argument("--coherent-min", type=float, default=COHERENT_MIN)
    p.add_argument("--filter", default=None, help="topic filter on judged files, e.g. medical>50")
    p.add_argument("--no-balance", action="store_true", help="keep the whole aligned set (paper: subsample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs-per-domain", type=int, default=None, help="pairs files: first N pairs of each domain")
    p.add_argument("--split", default="dev", choices=list(SPLITS),
                   help="pairs files: which split (directions are built on dev; effects are measured on test)")
    p.add_argument("--load-in-4bit", action="store_true")
    return p.parse_args(argv)


@torch.inference_mode()
def answer_means(model, tok, items, batch_size=8, progress=True):
    """Per-answer mean of every block's output over the answer's tokens: ([n, n_layers, d], n_tokens [n],
    [n, n_layers] mean residual norm over the same tokens, the scale that steering and degeneracy checks use)."""
    layers = list(range(len(decoder_layers(model))))
    pairs = [(x["question"], x["answer"]) for x in items]
    means, counts = [None] * len(items), torch.zeros(len(items), dtype=torch.long)
    norms = [None] * len(items)
    dev = input_device(model)
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc="activations", unit="ans", disable=not progress)
    with record_resid(model, layers) as acts:
        for idx, ids, mask, spans in answer_batches(tok, pairs, batch_size):
            causal_lm(model).model(input_ids=ids.to(dev), attention_mask=mask.to(dev))  # no unembedding needed
            sel = torch.zeros(ids.shape, dtype=torch.float32)
            for row, (s, e) in enumerate(spans):
                sel[row, s:e] = 1.0
            n = sel.sum(1)
            # one einsum per layer: the sum over exactly the answer positions, then divide by their count
            per_layer = [torch.einsum("bt,btd->bd", sel.to(acts[i].device), acts[i].float()).cpu() for i in layers]
            stacked = torch.stack(per_layer, 1) / n[:, None, None]
            norm = torch.stack([(sel.to(acts[i].device) * acts[i].float().norm(dim=-1)).sum(1).cpu() for i in layers],
                               1) / n[:, None]
            for row, i in enumerate(idx):
                means[i], counts[i], norms[i] = stacked[row], int(n[row]), norm[row]
            bar.update(len(idx))
    bar.close()
    return torch.stack(means), counts, torch.stack(norms)


def main(argv=None):
    args = parse_args(argv)
    items = labelled_answers(args.inp, args.aligned_min, args.misaligned_max, args.coherent_min, args.filter,
                             balance=not args.no_balance, seed=args.seed, per_domain=args.pairs_per_domain,
                             split=args.split)
    model, tok = load_model(args.model, args.adapter, args.load_in_4bit)
    t0 = time.time()
    means, counts, norms = answer_means(model, tok, items, args.batch_size)
    meta = {"model": args.model, "adapter": args.adapter, "source": args.inp, "filter": args.filter,
            "thresholds": {"aligned_min": args.aligned_min, "misaligned_max": args.misaligned_max,
                           "coherent_min": args.coherent_min}, "balanced": not args.no_balance, "seed": args.seed,
            "pairs_per_domain": args.pairs_per_domain, "split": args.split,
            "n_layers": means.shape[1], "d_model": means.shape[2]}
    save_pt(args.out, {"means": means, "n_tokens": counts, "resid_norm": norms,
                       "misaligned": torch.tensor([x["misaligned"] for x in items]),
                       "medical": torch.tensor([x["medical"] for x in items]),
                       "ids": [x["id"] for x in items], "domains": [x["domain"] for x in items], "meta": meta})
    mis = sum(x["misaligned"] for x in items)
    print(f"wrote {args.out}: {mis} misaligned + {len(items) - mis} aligned answers, {int(counts.sum())} tokens, "
          f"{means.shape[1]} layers x {means.shape[2]}, {time.time() - t0:.1f}s")


if __name__ == "__main__":
    cli(main)
