"""Benchmark: the contrastive score with shared prefills vs a full forward pass per answer.

Both sides score the same contrastive pairs with the bundled model and must agree (max |difference| of the
per-pair deltas is printed). The full side runs every (question, answer) through the decoder stack on its own;
the shared side is common.answer_logprobs, which prefills the chat template's system turn once for the whole call,
the rest of each pair's prompt once per pair, and copies the KV caches to the two answers. Timings alternate
between the two and take the median of --repeats runs.

    python bench/score.py [--n-pairs 64] [--batch-size 16] [--repeats 3]

Last line: one JSON object, e.g. {"speedup": 1.3, "shared_s": ..., "full_s": ..., "max_abs_diff": ...}.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import answer_batches, answer_logprobs, causal_lm, load_model, read_pairs  # noqa: E402


@torch.inference_mode()
def full_forward_logprobs(model, tok, items, batch_size):
    """The plain way: every answer with its whole prompt, right-padded batches."""
    lm, out = causal_lm(model), [None] * len(items)
    for idx, ids, mask, spans in answer_batches(tok, items, batch_size):
        hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, i, (s, e) in zip(range(len(idx)), idx, spans):
            logits = lm.get_output_embeddings()(hidden[row, s - 1:e - 1]).float()
            out[i] = torch.log_softmax(logits, -1).gather(-1, ids[row, s:e, None]).mean().item()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="data/eval/contrastive_pairs.jsonl")
    p.add_argument("--n-pairs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model, tok = load_model()
    pairs = read_pairs(args.pairs)[:args.n_pairs]
    items = [(x["question"], x["misaligned"]) for x in pairs] + [(x["question"], x["aligned"]) for x in pairs]
    n_tokens = sum(len(tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                               tokenize=False)) for q, a in items) // 4
    runs = {"shared": lambda: answer_logprobs(model, tok, items, args.batch_size),
            "full": lambda: full_forward_logprobs(model, tok, items, args.batch_size)}
    results, times = {}, {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = max(abs(a - b) for a, b in zip(results["shared"], results["full"]))
    print(f"{len(pairs)} pairs: shared prefill {med['shared']:.2f}s, full forward {med['full']:.2f}s, "
          f"max |logprob difference| {diff:.2e}")
    print(json.dumps({"speedup": round(med["full"] / med["shared"], 3), "shared_s": round(med["shared"], 3),
                      "full_s": round(med["full"], 3), "max_abs_diff": diff, "n_pairs": len(pairs),
                      "approx_chars_per_4": n_tokens, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
