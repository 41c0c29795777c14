"""Check a run_all.sh plan without running it, and print its time, memory and judge-cost estimate.

`bash run_all.sh --preset paper --dry-run` writes every command the run would execute (name, command) to a plan
file and calls this script on it. In one Python process, each `python SCRIPT.py ARGS` line is parsed by that
script's own parse_args, so a flag a script does not accept, a bad value or a missing required argument shows up
here, not an hour into a GPU run. Values known only after an earlier step (e.g. the half-depth layer read from
run_config.json) appear as <placeholders>; they are replaced by a valid dummy value for the check and printed as
they are. Nothing is loaded, nothing runs, no CUDA or judge key is needed: their checks are reported instead.

The estimates are arithmetic on the plan, for the paper's model (Qwen2.5-14B-Instruct, bf16; docs/method.md#settings
and the README's GPU section), not measurements:
- memory: weights 14.8e9 parameters x 2 bytes = 29.5 GB; training adds ~10 GB of saved activations (2 sequences
  x 512 tokens x 5120 x 48 layers x ~20 tensors x 2 bytes); sampling a batch of 32 x 660 tokens adds a KV cache of
  2 x 48 x 8 x 128 x 2 bytes = 0.19 MB a token, ~4 GB;
- time: training ~4 x 14.8e9 FLOPs per token (forward, and backward through the frozen base) at an assumed
  160 TFLOP/s sustained; sampling is memory-bound, one decode step of the batch per weight read (29.5 GB at an
  assumed 3 TB/s); scoring and activations are one forward pass per token at the training rate;
- judge cost: per judged answer, 3 metrics x ~480 input tokens at $2.50 per million input tokens (GPT-4o).

Example:
    bash run_all.sh --preset paper --dry-run
    python dry_run.py --plan plan.tsv --preset paper
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import sys
from pathlib import Path

from common import InputError, cli, read_jsonl

PARAMS = 14.8e9
WEIGHTS_GB = PARAMS * 2 / 1e9
TRAIN_ACT_GB = 2 * 512 * 5120 * 48 * 20 * 2 / 1e9
KV_GB_PER_TOKEN = 2 * 48 * 8 * 128 * 2 / 1e9
FLOPS = 160e12  # sustained bf16 FLOP/s assumed for one H100/H200-class GPU
BANDWIDTH = 3e12  # bytes/s of weight reads assumed for memory-bound decoding
TOKENS_PER_TEXT = 250  # a question plus an answer of the training sets or pairs, rounded up
JUDGE_TOKENS, JUDGE_PRICE, METRICS = 480, 2.50e-6, 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="TSV of (step name, command), written by run_all.sh --dry-run")
    p.add_argument("--preset", default="paper")
    p.add_argument("--json", default=None, help="also write the plan and its estimates here")
    return p.parse_args(argv)


def check_command(argv):
    """Parse one script's arguments with its own parser: None if fine, else the parser's complaint."""
    script, args = argv[0], argv[1:]
    module = importlib.import_module(Path(script).stem)
    args = [re.sub(r"<[^>]*>", "1", a) for a in args]  # placeholders: a valid dummy value
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            module.parse_args(args)
    except SystemExit as e:
        return (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]
    return None


def flag(args, name, default=None):
    return args[args.index(name) + 1] if name in args else default


def count_lines(path, split=None):
    try:
        rows = read_jsonl(path)
    except InputError:
        return 0
    return sum(1 for r in rows if split in (None, "all") or r.get("split") == split.split("-")[0])


def estimate(script, args):
    """(hours, peak GB, judged answers) of one command, by the arithmetic of the module docstring."""
    if script == "train_rank1.py":
        n = count_lines(flag(args, "--data", ""))
        n = min(n, int(flag(args, "--max-examples", n) or n))
        tokens = n * TOKENS_PER_TEXT * float(flag(args, "--epochs", 1))
        return 4 * PARAMS * tokens / FLOPS / 3600, WEIGHTS_GB + TRAIN_ACT_GB, 0
    if script == "ablate_eval.py":
        files = []
        for a in args[args.index("--questions") + 1:] if "--questions" in args else []:
            if a.startswith("--"):
                break
            files.append(a)
        n_q = sum(count_lines(q) for q in files)
        samples = int(flag(args, "--n-samples", 50)) * n_q
        max_new = int(flag(args, "--max-new-tokens", 600))
        n_cond = 1 + sum(int(flag(args, f, 0)) for f in ("--shuffled", "--random-control"))
        if "--steer" in args and "--steer-choose" not in args:
            n_cond += len(flag(args, "--layers").split(",")) * len(flag(args, "--scales").split(",")) - 1
        pairs = count_lines(flag(args, "--pairs", ""), flag(args, "--split", "test")) if "--pairs" in args else 0
        score_tokens = n_cond * 2 * pairs * TOKENS_PER_TEXT
        decode = n_cond * -(-samples // 32) * max_new * WEIGHTS_GB * 1e9 / BANDWIDTH
        judged = samples * n_cond if "--judge" in args else 0
        return (2 * PARAMS * score_tokens / FLOPS + decode) / 3600, WEIGHTS_GB + 32 * 660 * KV_GB_PER_TOKEN, judged
    if script in ("collect_acts.py", "probe_adapters.py", "dynamics.py", "plant_organism.py"):
        pairs = count_lines(flag(args, "--in", flag(args, "--pairs", "")), flag(args, "--split", "dev"))
        passes = {"dynamics.py": 10, "probe_adapters.py": 3}.get(script, 1)
        return passes * 2 * PARAMS * 2 * pairs * TOKENS_PER_TEXT / FLOPS / 3600, WEIGHTS_GB + 2, 0
    return 0.0, 0.0, 0


def main(argv=None):
    args = parse_args(argv)
    lines = [line.split("\t", 1) for line in Path(args.plan).read_text().splitlines() if line.strip()]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows, bad = [], 0
    for name, cmd in lines:
        argv_ = shlex.split(cmd)
        script = argv_[1] if len(argv_) > 1 and argv_[0] == "python" and argv_[1].endswith(".py") else None
        problem = check_command(argv_[1:]) if script else None
        hours, gb, judged = estimate(script, argv_[2:]) if script else (0.0, 0.0, 0)
        bad += problem is not None
        rows.append({"step": name, "command": cmd, "ok": problem is None, "problem": problem, "hours": hours,
                     "peak_gb": gb, "judged_answers": judged, "judge_usd": judged * METRICS * JUDGE_TOKENS * JUDGE_PRICE})
    print(f"# plan: bash run_all.sh --preset {args.preset} ({len(rows)} steps)\n")
    for r in rows:
        mark = "ok " if r["ok"] else "BAD"
        est = f"~{r['hours'] * 60:.0f} min, {r['peak_gb']:.0f} GB" if r["peak_gb"] else "-"
        cost = f", judge ${r['judge_usd']:.2f}" if r["judge_usd"] else ""
        print(f"[{mark}] {r['step']}: {est}{cost}\n      {r['command']}" + (f"\n      -> {r['problem']}" if
                                                                            r["problem"] else ""))
    import torch

    total = {"hours": sum(r["hours"] for r in rows), "peak_gb": max((r["peak_gb"] for r in rows), default=0),
             "judge_usd": sum(r["judge_usd"] for r in rows), "bad": bad, "steps": len(rows),
             "cuda_here": torch.cuda.is_available(),
             "judge_key_here": bool(os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL")
                                    or os.environ.get("AZURE_OPENAI_ENDPOINT"))}
    print(f"\ntotal: ~{total['hours']:.1f} GPU hours (arithmetic, not measured), peak ~{total['peak_gb']:.0f} GB "
          f"(bf16), judge ~${total['judge_usd']:.0f}; {bad} command(s) with bad arguments")
    print(f"checks a real run makes first: CUDA {'available' if total['cuda_here'] else 'NOT available here'}; "
          f"judge key {'set' if total['judge_key_here'] else 'NOT set here'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": rows, "total": total}, indent=1))
    if bad:
        raise InputError(f"{bad} command(s) in the plan have bad arguments (marked BAD above)")


if __name__ == "__main__":
    cli(main)
