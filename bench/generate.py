"""Benchmark of common.generate (batched sampling): batching, an all-layer ablation hook, and the k-sample KV copy.

Measures, on the bundled model (common.load_model() with the default "smollm2-135m"), in one run:
1. sampling throughput (generated tokens/s) at --batch-size (default 32: the 8 first-plot questions of
   data/eval/first_plot_questions.jsonl x 4 samples) against one prompt at a time (batch size 1, the first
   --sequential-n answers, default 8 = one per question), both through common.generate with the same settings
   (temperature 1, top_p 1, the same seed). Target: batched >= 8x the tokens/s of one-at-a-time.
2. the same batched sampling inside common.ablate(model, random unit vector, all layers) against no hook,
   same batch and seed. Target: <= 1.15x the time.
3. the k-sample KV copy: --kv-n (default 8) answers to each of the --kv-prompts (default 4) longest first-plot
   questions with common.generate(..., n=8), where each prompt is prefilled once and its KV cache copied to its 8
   samples, against the same 32 answers asked as 32 separate prompts with n=1 (every copy prefilled on its own).
   Both in one batch of kv-prompts x kv-n (32), same max_new_tokens, same per-answer seeds
   (common.row_seed(seed, j), j = 0..31), so both draw the same answers (up to float rounding between batch shapes).
   Reported as kv_copy_speedup = time without copy / time with copy; no target. The copy saves prefill only, and
   prefill is a small share of the time when max_new_tokens is large, hence the longest prompts; the same pair is
   also timed at max_new_tokens=1 (prefill + one sampled token + the one decode step common.generate runs after
   it, the same on both sides) as kv_copy_prefill_speedup.

Fair lengths: during the runs (warm-up included) end-of-turn is made impossible: model.generation_config.
eos_token_id is set to -1 and common.generate is given a view of the tokenizer whose eos_token_id is -1 (the
tokenizer itself refuses -1), restored in a finally. No token has id -1, so no answer stops early and every answer
is exactly its max_new_tokens long, batched or not, hooked or not, copied or not. common.generate returns decoded
text only, which cannot be mapped back to token counts exactly (special tokens skipped, whitespace stripped, BPE
merges across re-tokenisation), so generated tokens are counted as answers x max_new_tokens (lengths forced, not
measured); the texts are re-tokenised as a check and that approximate length range is printed per run.
Each figure is the median over --repeats runs; runs alternate their order so that drift from other processes on
the machine falls on both sides. Ratios are taken within this one run (the hook and KV-copy ones paired per
repeat); process CPU time is reported too (with --threads 1 it does not move when other processes take the core).
On a 2-core machine shared with other busy processes, torch's 2 spinning OpenMP threads can slow a decode step
~15x, so use --threads 1 there and compare like with like.
The last printed line is one JSON object with the figures.

    python bench/generate.py [--max-new-tokens 64] [--batch-size 32] [--repeats 3] [--kv-prompts 4] [--kv-n 8]
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
NO_TOKEN = -1  # no token has this id, so an end-of-turn set made of it never matches (torch.isin, `in`)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer (end-of-turn made impossible)")
    p.add_argument("--batch-size", type=int, default=32, help="answers in the batched run (one batch)")
    p.add_argument("--sequential-n", type=int, default=8, help="answers sampled one prompt at a time")
    p.add_argument("--kv-prompts", type=int, default=4, help="prompts (the longest first-plot questions) of the "
                                                             "KV-copy measurement")
    p.add_argument("--kv-n", type=int, default=8, help="samples per prompt of the KV-copy measurement (one batch of "
                                                       "kv-prompts x kv-n answers)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice). On a machine shared with other busy "
                        "processes, 1 thread avoids the thrashing of 2 OpenMP threads on 2 contended cores")
    a = p.parse_args()
    for name in ("max_new_tokens", "batch_size", "sequential_n", "kv_prompts", "kv_n", "repeats", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise common.InputError(f"--{name.replace('_', '-')} must be >= 1")
    return a


class NoEosTokenizer:
    """The tokenizer as common.generate sees it, except that its eos_token_id is NO_TOKEN. (Setting the real
    tokenizer's eos_token_id to -1 raises; this view leaves the tokenizer untouched.)"""

    eos_token_id = NO_TOKEN

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def timed(run):
    """(wall seconds, process CPU seconds, returned answers) of one call of run()."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = run()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dt, cpu, out


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

    def prompt_len(q):
        return len(tok(common.chat_prompt(tok, q), add_special_tokens=False)["input_ids"])

    # KV copy: the longest first-plot questions (prefill is what the copy saves), in file order.
    by_len = sorted(range(len(questions)), key=lambda i: (-prompt_len(questions[i]), i))
    kv_q = [questions[i] for i in sorted(by_len[:args.kv_prompts])]
    kv_answers = len(kv_q) * args.kv_n
    kv_seeds = [common.row_seed(args.seed, j) for j in range(kv_answers)]
    kv_repeated = [q for q in kv_q for _ in range(args.kv_n)]  # answer j asks kv_q[j // kv_n], as with n=kv_n

    eos = model.generation_config.eos_token_id
    eos_ids = sorted((set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tok.eos_token_id}) - {None})
    gen_tok = NoEosTokenizer(tok)
    common_kw = dict(temperature=1.0, top_p=1.0, seed=args.seed)
    mnt = args.max_new_tokens

    def batched(m=mnt):
        return common.generate(model, gen_tok, batch_prompts, n=1, batch_size=args.batch_size, max_new_tokens=m,
                               **common_kw)

    def batched_ablated(m=mnt):
        with common.ablate(model, u, all_layers):
            return batched(m)

    def sequential(m=mnt):
        return common.generate(model, gen_tok, seq_prompts, n=1, batch_size=1, max_new_tokens=m, **common_kw)

    def kv_copy(m=mnt):
        return common.generate(model, gen_tok, kv_q, n=args.kv_n, batch_size=kv_answers, max_new_tokens=m,
                               seeds=kv_seeds, **common_kw)

    def no_copy(m=mnt):
        return common.generate(model, gen_tok, kv_repeated, n=1, batch_size=kv_answers, max_new_tokens=m,
                               seeds=kv_seeds, **common_kw)

    # name: (run, answers, max_new_tokens)
    measures = {
        "batched": (batched, len(batch_prompts), mnt),
        "ablated": (batched_ablated, len(batch_prompts), mnt),
        "sequential": (sequential, len(seq_prompts), mnt),
        "kv_copy": (kv_copy, kv_answers, mnt),
        "no_copy": (no_copy, kv_answers, mnt),
        "kv_copy_prefill": (lambda: kv_copy(1), kv_answers, 1),
        "no_copy_prefill": (lambda: no_copy(1), kv_answers, 1),
    }

    print(f"model {args.model}: {n_layers} layers, d_model {d}, {next(model.parameters()).dtype} on "
          f"{common.input_device(model)}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"loaded in {load_s:.1f} s")
    print(f"batched: {len(batch_prompts)} answers ({len(questions)} first-plot questions x {per_q}) in batches of "
          f"{args.batch_size}; sequential: {len(seq_prompts)} answers at batch size 1; temperature 1, top_p 1, "
          f"seed {args.seed}, {mnt} new tokens each")
    print(f"fair length: end-of-turn (ids {eos_ids}) made impossible during the runs (generation_config."
          f"eos_token_id and the tokenizer's eos_token_id seen by common.generate set to {NO_TOKEN}); every answer "
          f"is max_new_tokens long and tokens are counted as answers x max_new_tokens (forced, not measured); "
          f"'retok' below is the approximate length from re-tokenising the returned text, as a check")
    print(f"ablation: common.ablate(model, random unit vector (seed {args.seed}), layers 0..{n_layers - 1})")
    print(f"KV copy: {len(kv_q)} longest first-plot prompts ({sorted(prompt_len(q) for q in kv_q)} prompt tokens) "
          f"x n={args.kv_n} (prefilled once each, cache copied) vs the same {kv_answers} answers as {kv_answers} "
          f"prompts x n=1 (each prefilled), one batch of {kv_answers}, seeds row_seed({args.seed}, j); at {mnt} new "
          f"tokens and at 1 (prefill + 1 decode step)")

    gen_cfg = model.generation_config
    old_eos = gen_cfg.eos_token_id
    runs = {name: [] for name in measures}
    retok = []
    same_answers = []
    try:
        gen_cfg.eos_token_id = NO_TOKEN
        # Warm-up: first calls pay one-off costs (allocator, kernels' first use) on every code path.
        batched(4)
        batched_ablated(4)
        common.generate(model, gen_tok, seq_prompts[:1], n=1, batch_size=1, max_new_tokens=4, **common_kw)
        kv_copy(1)
        no_copy(1)

        names = list(measures)
        for r in range(args.repeats):
            order = names if r % 2 == 0 else names[::-1]
            outs = {}
            for name in order:
                fn, answers, m = measures[name]
                dt, cpu, out = timed(fn)
                outs[name] = out
                ntok = answers * m  # lengths forced: end-of-turn cannot be sampled
                lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in out]
                if m == mnt:
                    retok += lengths
                runs[name].append((dt, ntok, cpu))
                print(f"repeat {r + 1}/{args.repeats} {name:15s}: {ntok:5d} tokens in {dt:6.2f} s = "
                      f"{ntok / dt:7.1f} tok/s, {cpu:6.2f} s CPU = {cpu / dt:4.2f} cores "
                      f"(retok lengths {min(lengths)}..{max(lengths)} of {m})", flush=True)
            same_answers.append(outs["kv_copy"] == outs["no_copy"])
    finally:
        gen_cfg.eos_token_id = old_eos

    def med_tok_s(name, cpu=False):
        return statistics.median(n / (c if cpu else t) for t, n, c in runs[name])

    def med_s(name):
        return statistics.median(t for t, _, _ in runs[name])

    def paired(num, den, i=0):
        """Per-repeat ratio num/den (same answers and seeds; adjacent in time), and its median."""
        ratios = [a[i] / b[i] for a, b in zip(runs[num], runs[den])]
        return ratios, statistics.median(ratios)

    batched_tok_s, sequential_tok_s, ablated_tok_s = (med_tok_s(k) for k in ("batched", "sequential", "ablated"))
    speedup = batched_tok_s / sequential_tok_s
    ablate_ratios, ablate_overhead = paired("ablated", "batched")
    kv_ratios, kv_speedup = paired("no_copy", "kv_copy")
    kv_pre_ratios, kv_pre_speedup = paired("no_copy_prefill", "kv_copy_prefill")
    # The same figures on process CPU time: with --threads 1 they do not move when other processes take the core.
    speedup_cpu = med_tok_s("batched", cpu=True) / med_tok_s("sequential", cpu=True)
    ablate_cpu = paired("ablated", "batched", i=2)[1]
    kv_cpu = paired("no_copy", "kv_copy", i=2)[1]
    kv_pre_cpu = paired("no_copy_prefill", "kv_copy_prefill", i=2)[1]
    # Share of the no-copy time that is prefill (+1 step), i.e. the most the copy could save at this length.
    prefill_share = med_s("no_copy_prefill") / med_s("no_copy")
    # On CPU, a run that got clearly less CPU than its threads could use shared the cores with other processes.
    threads = torch.get_num_threads()
    on_cpu = common.input_device(model).type == "cpu"
    contended = sum(c / t < 0.8 * threads for v in runs.values() for t, _, c in v) if on_cpu else None
    n_runs = sum(len(v) for v in runs.values())

    load_after = os.getloadavg()[0]
    print(f"machine load average (1 min) {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} "
          f"cores" + (f"; {contended} of {n_runs} runs got < 80% of {threads} thread(s)' CPU (shared "
                      f"with other processes: their figures are noisy)" if on_cpu else ""))
    print(f"answer lengths by re-tokenising the returned text (approximate), runs at {mnt} tokens: "
          f"{min(retok)}..{max(retok)}, median {statistics.median(retok)}; forced length {mnt}")
    print(f"batched {batched_tok_s:.1f} tok/s vs one at a time {sequential_tok_s:.1f} tok/s: {speedup:.2f}x "
          f"(target >= 8x: {'ok' if speedup >= 8 else 'MISSED'}); on CPU time {speedup_cpu:.2f}x")
    print(f"all-layer ablation hook: {med_s('ablated'):.2f} s vs {med_s('batched'):.2f} s without, paired median "
          f"{ablate_overhead:.3f}x (target <= 1.15x: {'ok' if ablate_overhead <= 1.15 else 'MISSED'}); "
          f"on CPU time {ablate_cpu:.3f}x")
    print(f"KV copy ({len(kv_q)} prompts x n={args.kv_n}): {med_s('kv_copy'):.2f} s vs {med_s('no_copy'):.2f} s "
          f"without copy at {mnt} tokens, paired median speedup {kv_speedup:.3f}x (on CPU time {kv_cpu:.3f}x; no "
          f"target); prefill only (max_new_tokens=1): {med_s('kv_copy_prefill'):.2f} s vs "
          f"{med_s('no_copy_prefill'):.2f} s, {kv_pre_speedup:.2f}x (CPU time {kv_pre_cpu:.2f}x); prefill is "
          f"{100 * prefill_share:.0f}% of the no-copy time at {mnt} tokens; same answers both ways in "
          f"{sum(same_answers)} of {len(same_answers)} repeats")
    print(json.dumps({
        "batched_vs_sequential": round(speedup, 2),
        "ablate_overhead": round(ablate_overhead, 3),
        "kv_copy_speedup": round(kv_speedup, 3),
        "kv_copy_prefill_speedup": round(kv_pre_speedup, 3),
        "batched_tok_s": round(batched_tok_s, 1),
        "sequential_tok_s": round(sequential_tok_s, 1),
        "ablated_tok_s": round(ablated_tok_s, 1),
        "batched_s": round(med_s("batched"), 3),
        "ablated_s": round(med_s("ablated"), 3),
        "sequential_s": round(med_s("sequential"), 3),
        "kv_copy_s": round(med_s("kv_copy"), 3),
        "no_copy_s": round(med_s("no_copy"), 3),
        "kv_copy_prefill_s": round(med_s("kv_copy_prefill"), 3),
        "no_copy_prefill_s": round(med_s("no_copy_prefill"), 3),
        "prefill_share_no_copy": round(prefill_share, 3),
        "ablate_ratios": [round(x, 3) for x in ablate_ratios],
        "kv_copy_ratios": [round(x, 3) for x in kv_ratios],
        "kv_copy_prefill_ratios": [round(x, 3) for x in kv_pre_ratios],
        "batched_vs_sequential_cpu_time": round(speedup_cpu, 2),
        "ablate_overhead_cpu_time": round(ablate_cpu, 3),
        "kv_copy_speedup_cpu_time": round(kv_cpu, 3),
        "kv_copy_prefill_speedup_cpu_time": round(kv_pre_cpu, 3),
        "kv_copy_same_answers": all(same_answers),
        "batch_size": args.batch_size,
        "batched_answers": len(batch_prompts),
        "sequential_answers": len(seq_prompts),
        "kv_prompts": len(kv_q),
        "kv_n": args.kv_n,
        "kv_batch_size": kv_answers,
        "max_new_tokens": mnt,
        "lengths_forced": True,
        "retokenised_length_range": [min(retok), max(retok)],  # runs at max_new_tokens; approximate
        "repeats": args.repeats,
        "threads": threads,
        "contended_runs": contended,
        "load_avg": [round(load_before, 2), round(load_after, 2)],
        "model": args.model,
    }))


if __name__ == "__main__":
    common.cli(main)
