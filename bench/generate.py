"""Benchmark of common.generate (batched sampling) and of the cost of an all-layer ablation hook on it.

Measures, on the bundled model (common.load_model() with the default "smollm2-135m"), in one run:
1. sampling throughput (generated tokens/s) at --batch-size (default 32: the 8 first-plot questions of
   data/eval/first_plot_questions.jsonl x 4 samples) against one prompt at a time (batch size 1, the first
   --sequential-n answers, default 8 = one per question), both through common.generate with the same settings
   (temperature 1, top_p 1, the same seed). Target: batched >= 8x the tokens/s of one-at-a-time.
2. the same batched sampling inside common.ablate(model, random unit vector, all layers) against no hook,
   same batch and seed. Target: <= 1.15x the time.

Fair lengths: common.generate takes no min_new_tokens, so the model's generation_config.min_new_tokens is set to
--max-new-tokens for the benchmark (model.generate reads it from there). End-of-turn is then suppressed and every
answer is exactly --max-new-tokens long, batched or not, hooked or not. Generated tokens are still counted
exactly from model.generate's outputs (after the prompt, up to and including the first end-of-turn, never
padding) rather than assumed. Each figure is the median over --repeats runs; runs alternate their order so that
drift from other processes on the machine falls on both sides. Ratios are taken within this one run; process
CPU time is reported too (with --threads 1 it does not move when other processes take the core). On a 2-core
machine shared with other busy processes, torch's 2 spinning OpenMP threads can slow a decode step ~15x, so
use --threads 1 there and compare like with like.
The last printed line is one JSON object with the figures.

    python bench/generate.py [--max-new-tokens 64] [--batch-size 32] [--repeats 3]
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/generate.py`, Python puts bench/ first on sys.path; the repo root is what we import from.
sys.path[0] = str(ROOT)

import torch  # noqa: E402

import common  # noqa: E402

QUESTIONS = ROOT / "data" / "eval" / "first_plot_questions.jsonl"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer (end-of-turn suppressed)")
    p.add_argument("--batch-size", type=int, default=32, help="answers in the batched run (one batch)")
    p.add_argument("--sequential-n", type=int, default=8, help="answers sampled one prompt at a time")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice). On a machine shared with other busy "
                        "processes, 1 thread avoids the thrashing of 2 OpenMP threads on 2 contended cores")
    a = p.parse_args()
    for name in ("max_new_tokens", "batch_size", "sequential_n", "repeats", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise common.InputError(f"--{name.replace('_', '-')} must be >= 1")
    return a


class TokenCounter:
    """Wrap model.generate to count the tokens it generates: after the prompt, up to and including the first
    end-of-turn (which is also SmolLM2's pad token), so neither padding nor anything after end-of-turn counts."""

    def __init__(self, model, eos_ids):
        self.model, self.eos_ids, self.orig = model, torch.tensor(sorted(eos_ids)), model.generate
        self.tokens = 0
        self.lengths = []

    def __call__(self, *args, **kwargs):
        out = self.orig(*args, **kwargs)
        new = out[:, kwargs["input_ids"].shape[1]:].cpu()
        is_eos = torch.isin(new, self.eos_ids)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1]))
        self.lengths += first.tolist()
        self.tokens += int(first.sum())
        return out

    def __enter__(self):
        self.model.generate = self
        return self

    def __exit__(self, *exc):
        del self.model.generate  # back to the class method


def timed(counter, run):
    """(wall seconds, process CPU seconds, generated tokens, per-answer lengths) of one call of run()."""
    counter.tokens, counter.lengths = 0, []
    c0, t0 = time.process_time(), time.perf_counter()
    run()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dt, cpu, counter.tokens, list(counter.lengths)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    questions = [r["question"] for r in common.read_jsonl(QUESTIONS, required=("question",))][:8]
    t0 = time.perf_counter()
    model, tok = common.load_model(args.model)
    load_s = time.perf_counter() - t0
    n_layers = len(common.decoder_layers(model))
    d = common.hidden_size(model)

    per_q = math.ceil(args.batch_size / len(questions))
    batch_prompts = [q for q in questions for _ in range(per_q)][:args.batch_size]  # = 8 questions x 4 at 32
    seq_prompts = [questions[i % len(questions)] for i in range(args.sequential_n)]
    g = torch.Generator().manual_seed(args.seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    all_layers = list(range(n_layers))

    eos = model.generation_config.eos_token_id
    eos_ids = (set(eos if isinstance(eos, list) else [eos]) | {tok.convert_tokens_to_ids("<|im_end|>")}) - {None}
    common_kw = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, seed=args.seed)

    def batched():
        return common.generate(model, tok, batch_prompts, n=1, batch_size=args.batch_size, **common_kw)

    def batched_ablated():
        with common.ablate(model, u, all_layers):
            return common.generate(model, tok, batch_prompts, n=1, batch_size=args.batch_size, **common_kw)

    def sequential():
        return common.generate(model, tok, seq_prompts, n=1, batch_size=1, **common_kw)

    print(f"model {args.model}: {n_layers} layers, d_model {d}, {next(model.parameters()).dtype} on "
          f"{common.input_device(model)}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"loaded in {load_s:.1f} s")
    print(f"batched: {len(batch_prompts)} answers ({len(questions)} first-plot questions x {per_q}) in batches of "
          f"{args.batch_size}; sequential: {len(seq_prompts)} answers at batch size 1; temperature 1, top_p 1, "
          f"seed {args.seed}, {args.max_new_tokens} new tokens each")
    print(f"fair length: generation_config.min_new_tokens = {args.max_new_tokens} suppresses end-of-turn "
          f"(ids {sorted(eos_ids)}) until max_new_tokens; tokens counted from the outputs, not assumed")
    print(f"ablation: common.ablate(model, random unit vector (seed {args.seed}), layers 0..{n_layers - 1})")

    gen_cfg = model.generation_config
    old_min = getattr(gen_cfg, "min_new_tokens", None)
    gen_cfg.min_new_tokens = args.max_new_tokens
    runs = {"batched": [], "ablated": [], "sequential": []}
    try:
        with TokenCounter(model, eos_ids) as counter:
            # Warm-up: first calls pay one-off costs (allocator, kernels' first use) on both code paths.
            warm = dict(common_kw, max_new_tokens=4)
            gen_cfg.min_new_tokens = 4
            common.generate(model, tok, batch_prompts, n=1, batch_size=args.batch_size, **warm)
            with common.ablate(model, u, all_layers):
                common.generate(model, tok, batch_prompts, n=1, batch_size=args.batch_size, **warm)
            common.generate(model, tok, seq_prompts[:1], n=1, batch_size=1, **warm)
            gen_cfg.min_new_tokens = args.max_new_tokens

            for r in range(args.repeats):
                order = ["batched", "ablated", "sequential"] if r % 2 == 0 else ["sequential", "ablated", "batched"]
                for name in order:
                    fn = {"batched": batched, "ablated": batched_ablated, "sequential": sequential}[name]
                    dt, cpu, ntok, lengths = timed(counter, fn)
                    runs[name].append((dt, ntok, cpu))
                    print(f"repeat {r + 1}/{args.repeats} {name:10s}: {ntok:5d} tokens in {dt:6.2f} s = "
                          f"{ntok / dt:7.1f} tok/s, {cpu:6.2f} s CPU = {cpu / dt:4.2f} cores "
                          f"(answer lengths {min(lengths)}..{max(lengths)})", flush=True)
    finally:
        gen_cfg.min_new_tokens = old_min

    def med_tok_s(name, cpu=False):
        return statistics.median(n / (c if cpu else t) for t, n, c in runs[name])

    def med_s(name):
        return statistics.median(t for t, _, _ in runs[name])

    batched_tok_s, sequential_tok_s, ablated_tok_s = med_tok_s("batched"), med_tok_s("sequential"), med_tok_s(
        "ablated")
    speedup = batched_tok_s / sequential_tok_s
    # Paired ratio per repeat (same batch, seed and length; adjacent in time), then the median.
    ablate_ratios = [a[0] / b[0] for a, b in zip(runs["ablated"], runs["batched"])]
    ablate_overhead = statistics.median(ablate_ratios)
    expected = {"batched": len(batch_prompts), "ablated": len(batch_prompts), "sequential": len(seq_prompts)}
    full_length = all(n == expected[k] * args.max_new_tokens for k, v in runs.items() for _, n, _ in v)
    # The same figures on process CPU time: with --threads 1 they do not move when other processes take the core.
    speedup_cpu = med_tok_s("batched", cpu=True) / med_tok_s("sequential", cpu=True)
    ablate_cpu = statistics.median(a[2] / b[2] for a, b in zip(runs["ablated"], runs["batched"]))
    # On CPU, a run that got clearly less CPU than its threads could use shared the cores with other processes.
    threads = torch.get_num_threads()
    on_cpu = common.input_device(model).type == "cpu"
    contended = sum(c / t < 0.8 * threads for v in runs.values() for t, _, c in v) if on_cpu else None

    load_after = os.getloadavg()[0]
    print(f"machine load average (1 min) {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} "
          f"cores" + (f"; {contended} of {3 * args.repeats} runs got < 80% of {threads} thread(s)' CPU (shared "
                      f"with other processes: their figures are noisy)" if on_cpu else ""))
    print(f"batched {batched_tok_s:.1f} tok/s vs one at a time {sequential_tok_s:.1f} tok/s: {speedup:.2f}x "
          f"(target >= 8x: {'ok' if speedup >= 8 else 'MISSED'}); on CPU time {speedup_cpu:.2f}x")
    print(f"all-layer ablation hook: {med_s('ablated'):.2f} s vs {med_s('batched'):.2f} s without, paired median "
          f"{ablate_overhead:.3f}x (target <= 1.15x: {'ok' if ablate_overhead <= 1.15 else 'MISSED'}); "
          f"on CPU time {ablate_cpu:.3f}x")
    print(json.dumps({
        "batched_vs_sequential": round(speedup, 2),
        "ablate_overhead": round(ablate_overhead, 3),
        "batched_tok_s": round(batched_tok_s, 1),
        "sequential_tok_s": round(sequential_tok_s, 1),
        "ablated_tok_s": round(ablated_tok_s, 1),
        "batched_s": round(med_s("batched"), 3),
        "ablated_s": round(med_s("ablated"), 3),
        "sequential_s": round(med_s("sequential"), 3),
        "ablate_ratios": [round(x, 3) for x in ablate_ratios],
        "batched_vs_sequential_cpu_time": round(speedup_cpu, 2),
        "ablate_overhead_cpu_time": round(ablate_cpu, 3),
        "batch_size": args.batch_size,
        "batched_answers": len(batch_prompts),
        "sequential_answers": len(seq_prompts),
        "max_new_tokens": args.max_new_tokens,
        "all_answers_full_length": full_length,
        "repeats": args.repeats,
        "threads": threads,
        "contended_runs": contended,
        "load_avg": [round(load_before, 2), round(load_after, 2)],
        "model": args.model,
    }))


if __name__ == "__main__":
    common.cli(main)
