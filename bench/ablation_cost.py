"""Diagnostic: what projecting a direction out of the residual stream costs the model's coherence, and where.

An ablation verdict needs a *coherent* ablation (neutral log-prob falling by at most 0.15 nats/token). On the
bundled SmolLM2-135M, ablating the base model's own dev-pair direction fails that clause by far. This script
measures why, on the model with no adapter: the neutral log-prob change when the direction is projected out

- at every block, or at blocks L..last only (--from-block), and
- on every token, or on every token but the attention sinks: tokens whose residual norm exceeds --sink-factor x
  the batch median at that block (on SmolLM2, the first token: norm ~25,000 where the others have ~170),

and prints the first token's norm and projection on the direction at --direction-layer.

    python bench/ablation_cost.py --directions runs/planted/base/directions.pt --direction-layer 15 \
        --neutral runs/planted/neutral_subset.jsonl [--from-block 15]

Last line: one JSON object with the four costs (nats/token) and the first token's norm and projection.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (ablate, answer_batches, answer_logprobs, causal_lm, decoder_layers, load_model,  # noqa: E402
                    read_directions, read_jsonl, record_resid)


def sinks(factor):
    """The tokens whose residual norm is at least factor x the batch median (common.ablate's `spare`)."""
    def spare(hf):
        n = hf.norm(dim=-1)
        return n >= factor * n.median()
    return spare


def cost(model, tok, items, base, u, layers, sink_factor):
    """Mean change of the answers' token log-prob with u projected out at `layers` (sinks kept if sink_factor)."""
    with ablate(model, u, layers, spare=sinks(sink_factor) if sink_factor else None):
        lp = answer_logprobs(model, tok, items)
    return sum(a - b for a, b in zip(lp, base)) / len(lp)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--directions", required=True)
    p.add_argument("--neutral", default="data/eval/neutral.jsonl")
    p.add_argument("--n", type=int, default=20, help="neutral answers scored")
    p.add_argument("--direction-layer", type=int, default=15)
    p.add_argument("--from-block", type=int, default=15)
    p.add_argument("--sink-factor", type=float, default=20.0)
    args = p.parse_args()
    model, tok = load_model()
    u = read_directions(args.directions)["directions"][args.direction_layer].float()
    u = u / u.norm()
    items = [(r["question"], r["answer"]) for r in read_jsonl(args.neutral)[:args.n]]
    with torch.inference_mode():
        base = answer_logprobs(model, tok, items)
        with record_resid(model, [args.direction_layer]) as store:
            _, ids, mask, _ = next(answer_batches(tok, items[:1], 1))
            causal_lm(model).model(input_ids=ids, attention_mask=mask)
        h = store[args.direction_layer][0].float()
        first = {"norm": float(h[0].norm()), "projection": float(h[0] @ u),
                 "other_tokens_norm": float(h[1:].norm(dim=-1).mean()),
                 "other_tokens_projection": float((h[1:] @ u).mean())}
        n = len(decoder_layers(model))
        out = {}
        for name, layers in (("every_block", list(range(n))), (f"blocks_{args.from_block}_up",
                                                               list(range(args.from_block, n)))):
            for sinks, factor in (("all_tokens", 0), ("sinks_kept", args.sink_factor)):
                out[f"{name}_{sinks}"] = round(cost(model, tok, items, base, u, layers, factor), 3)
                print(f"{name:>16} {sinks:>10}: {out[f'{name}_{sinks}']:+.3f} nats/token", flush=True)
    print(f"first token at block {args.direction_layer}: norm {first['norm']:.0f}, projection on u "
          f"{first['projection']:+.0f}; other tokens: norm {first['other_tokens_norm']:.0f}, projection "
          f"{first['other_tokens_projection']:+.1f}")
    print(json.dumps({**out, "first_token": first, "n_neutral": len(items)}))


if __name__ == "__main__":
    main()
