"""Benchmark of judge.py's openai backend against a local fake OpenAI-compatible server (no network, no key).

Measures what matters for a 400-answer evaluation (8 questions x 50 samples, docs/method.md#evaluation) against a judge
API with 50 ms latency per request:
1. wall time of 400 judgments at --concurrency 32;
2. per-item time at concurrency 1, measured on a subset (default 60 items) and scaled per item, since the
   full serial run would only take 400 x 50 ms = 20 s to confirm the same number;
3. a run of 400 with 10% of requests answered 429 or 500 (no retry-after header, so the client's own
   exponential back-off is used): every judgment must still arrive.
The server runs in its own process, like a real API, so only the client's own overhead is measured. The
client's CPU time per item is printed too: on a busy machine the wall time is bound by the CPU share the
client gets, not by the judge's latency.
The last printed line is one JSON object.

    python bench/judge.py
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/judge.py`, Python puts bench/ first on sys.path, where this file would shadow the
# top-level judge.py; put the repo root there instead.
sys.path[0] = str(ROOT)

import judge  # noqa: E402
from bench.fake_openai_server import serve_in_subprocess  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=400, help="judgments per run")
    p.add_argument("--serial-n", type=int, default=60, help="items timed at concurrency 1")
    p.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--error-rate", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the fastest counts")
    return p.parse_args()


def rows(n, tag):
    return [{"question_id": f"q{i % 8}", "question": f"Question {i % 8}?", "domain": "general", "sample": i,
             "response": f"{tag} answer {i}", "model": "bench", "adapter": None, "intervention": "none"}
            for i in range(n)]


def timed_run(items, concurrency, **server):
    """Judge `items` for `aligned` against a fresh server process.
    Returns (wall seconds, judged rows, server counters + the client's CPU seconds)."""
    with serve_in_subprocess(top=[("42", 0.6), ("40", 0.3), ("CODE", 0.1)], **server) as (url, stats):
        os.environ["OPENAI_BASE_URL"] = url
        t, cpu = time.perf_counter(), time.process_time()
        out = judge.judge_rows(items, ["aligned"], concurrency=concurrency, progress=False)
        return time.perf_counter() - t, out, dict(stats(), client_cpu_s=time.process_time() - cpu)


def main():
    args = parse_args()
    os.environ.pop("AZURE_OPENAI_ENDPOINT", None)
    os.environ["OPENAI_API_KEY"] = "bench"
    os.environ["NO_PROXY"] = "127.0.0.1"
    timed_run(rows(8, "warm-up"), 8)  # imports openai and starts the event loop machinery once

    # Other processes on a shared machine steal CPU from the client; like timeit, keep the fastest run.
    par = [timed_run(rows(args.n, f"par{r}"), args.concurrency, delay=args.latency) for r in range(args.repeats)]
    ser = [timed_run(rows(args.serial_n, f"ser{r}"), 1, delay=args.latency) for r in range(args.repeats)]
    t_par, _, st_par = min(par, key=lambda run: run[0])
    t_ser = min(run[0] for run in ser)
    per_par, per_ser = t_par / args.n, t_ser / args.serial_n
    print(f"concurrency {args.concurrency}: {args.n} judgments in {t_par:.2f} s ({1000 * per_par:.2f} ms/item, "
          f"max {st_par['max_in_flight']} in flight; fastest of {args.repeats}; client CPU "
          f"{1000 * st_par['client_cpu_s'] / args.n:.2f} ms/item)")
    print(f"concurrency 1: {args.serial_n} judgments in {t_ser:.2f} s ({1000 * per_ser:.2f} ms/item; "
          f"measured on {args.serial_n} items, scaled per item; fastest of {args.repeats})")

    t_err, out, st_err = timed_run(rows(args.n, "err"), args.concurrency, delay=args.latency,
                                   error_rate=args.error_rate, retry_after_ms=None, seed=1)
    lost = sum(r["aligned"] is None or "error" in r for r in out)
    injected = st_err["requests"] - args.n
    print(f"{args.error_rate:.0%} injected errors: {injected} errors retried, {lost} judgments lost, "
          f"{t_err:.2f} s")

    result = {"speedup": round(per_ser / per_par, 1), "lost": lost, "n": args.n, "latency_s": args.latency,
              "concurrency": args.concurrency, "wall_s_concurrent": round(t_par, 3),
              "ms_per_item_concurrent": round(1000 * per_par, 2), "ms_per_item_serial": round(1000 * per_ser, 2),
              "serial_items_measured": args.serial_n, "max_in_flight": st_par["max_in_flight"],
              "client_cpu_ms_per_item": round(1000 * st_par["client_cpu_s"] / args.n, 2),
              "errors_injected": injected, "wall_s_with_errors": round(t_err, 3),
              "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
