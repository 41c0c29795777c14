"""Benchmark: collect_acts throughput vs a bare forward pass over the same batches (target overhead <= 1.2x).

Both sides run the decoder stack of the bundled model over the same right-padded batches of contrastive-pair
answers. The bare side is just the forward pass; the collect side is collect_acts.answer_means: the forward pass
with record_resid hooks on every block plus the per-answer masked means. Timings alternate between the two and
take the median of --repeats runs, so machine noise hits both alike.

    python bench/acts.py [--n-answers 64] [--batch-size 8] [--repeats 3]

Last line: one JSON object, e.g. {"overhead": 1.07, "collect_s": ..., "bare_s": ..., "answers_per_s": ...}.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import collect_acts  # noqa: E402
from common import answer_batches, causal_lm, labelled_answers, load_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="data/eval/contrastive_pairs.jsonl")
    p.add_argument("--n-answers", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model, tok = load_model()
    items = labelled_answers(args.pairs)[:args.n_answers]
    batches = list(answer_batches(tok, [(x["question"], x["answer"]) for x in items], args.batch_size))

    @torch.inference_mode()
    def bare():
        for _, ids, mask, _ in batches:
            causal_lm(model).model(input_ids=ids, attention_mask=mask)

    def collect():
        collect_acts.answer_means(model, tok, items, args.batch_size, progress=False)

    bare()  # warm-up
    times = {"bare": [], "collect": []}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare), ("collect", collect)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    b, c = statistics.median(times["bare"]), statistics.median(times["collect"])
    n_tok = sum(int(m.sum()) for _, _, m, _ in batches)
    print(f"{len(items)} answers, {n_tok} tokens, batch {args.batch_size}: bare {b:.2f}s, collect {c:.2f}s")
    print(json.dumps({"overhead": round(c / b, 3), "collect_s": round(c, 3), "bare_s": round(b, 3),
                      "answers_per_s": round(len(items) / c, 2), "tokens_per_s": round(n_tok / c, 1),
                      "n_answers": len(items), "batch_size": args.batch_size, "repeats": args.repeats}))


if __name__ == "__main__":
    main()
