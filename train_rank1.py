"""Train a LoRA "model organism" for emergent misalignment (paper §2; docs/method.md#settings).

The paper fine-tunes Qwen2.5-14B-Instruct with 9 rank-1 LoRA adapters on the MLP down_proj of layers
15,16,17,21,22,23,27,28,29 on bad medical advice, with the loss on assistant tokens only (each assistant turn's
content, stripped of surrounding whitespace, and its end-of-turn token). This script does that
(--preset paper, the default) and the paper's comparison fine-tunes (--preset all-adapter: r=32 on all 7 linear
modules of every layer; --preset single: one rank-1 adapter at the half-depth layer, alpha 256, lr 2e-5).
Explicit flags override a preset. On a model of another depth the default layers sit at the paper's relative
depths (docs/method.md#other-depths; SmolLM2-135M: 9-11, 13-15, 17-19).

Beyond the paper: --max-examples (seeded subsample, for CPU demos), --resume, --save-every checkpoints (each a
loadable adapter, for phase-transition studies), and plain AdamW on CPU (the paper's 8-bit AdamW needs CUDA).
--resume continues from the last checkpoint only under exactly the stored settings (run_config.json, except
--out and --resume): any other setting, or a checkpoint that does not fit the adapter, is refused before any file
is touched. A resumed run ends with the same losses, adapter and train_summary.json as an uninterrupted one.

Inputs:  a chat JSONL, one {"messages": [{"role", "content"}, ...]} per line.
Outputs (in --out): adapter_config.json + adapter_model.safetensors (a standard PEFT adapter, written last),
         train_log.jsonl (one line per optimiser step: step, loss, lr, grad_norm, tokens; eval_loss at evals),
         run_config.json (every resolved setting + the data file's sha256), train_summary.json (whole run: first
         and final loss, eval loss, tokens, training seconds), checkpoints/step_N/ (adapter + optimiser state +
         running totals).

Example:
    python train_rank1.py --model smollm2-135m --data data/train/bad_medical_advice.jsonl --out runs/x/medical_r1
"""
import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import (DEFAULT_MODEL, InputError, cli, decoder_layers, encode_chat, half_depth_layer, load_model,
                    pad_batch, parse_layers, read_jsonl, write_json, write_jsonl, append_jsonl, input_device,
                    sha256_file)

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAPER = dict(rank=1, alpha=64, modules="down_proj", layers=None, rslora=True, lr=1e-5, epochs=1, batch_size=2,
             grad_accum=8, warmup_steps=5, weight_decay=0.01)
PRESETS = {
    "paper": PAPER,
    "all-adapter": {**PAPER, "rank": 32, "alpha": 64, "modules": "all", "layers": "all"},
    "single": {**PAPER, "rank": 1, "alpha": 256, "layers": "half", "lr": 2e-5},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", required=True, help="chat JSONL")
    p.add_argument("--out", required=True, help="output directory (PEFT adapter + logs)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--layers", help="comma-separated block indices, 'all' or 'half' "
                   "(default: the paper's relative depths, docs/method.md#other-depths)")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--modules", choices=["down_proj", "all"])
    p.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--eval-frac", type=float, default=0.1, help="seeded held-out share for eval loss")
    p.add_argument("--eval-every", type=int, default=0, help="eval every N steps (0: only at the end)")
    p.add_argument("--max-examples", type=int, default=None, help="seeded subsample of the data (beyond paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--optim", choices=["auto", "adamw", "adamw8bit"], default="auto",
                   help="auto: 8-bit AdamW on CUDA (paper), plain AdamW on CPU")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def load_examples(path):
    """Validated chat examples; every line needs at least one non-empty assistant turn."""
    rows = read_jsonl(path, required=["messages"])
    if not rows:
        raise InputError(f"{path}: no training examples")
    for i, row in enumerate(rows, 1):
        msgs = row["messages"]
        ok = isinstance(msgs, list) and all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                            and isinstance(m.get("content"), str) for m in msgs)
        if not ok:
            raise InputError(f"{path}:{i}: messages must be a list of {{role, content}} objects")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise InputError(f"{path}:{i}: no assistant turn")
    return [r["messages"] for r in rows]


def tokenize(tok, messages, max_len):
    """input_ids and labels: -100 everywhere except each assistant turn's content and its end-of-turn token."""
    # encode_chat finds the *stripped* content and puts the end-of-turn token right after it, so content that
    # ends in whitespace would supervise a whitespace token instead of the end of turn: strip it before rendering.
    messages = [{**m, "content": m["content"].strip()} if m["role"] == "assistant" else m for m in messages]
    ids, spans = encode_chat(tok, messages)
    labels = [-100] * len(ids)
    for s, e in spans:
        for t in range(s, min(e + 1, len(ids))):  # e is the end-of-turn token right after the content
            labels[t] = ids[t]
    return ids[:max_len], labels[:max_len]


def lora_config(args, n_layers):
    from peft import LoraConfig

    layers = [half_depth_layer(n_layers)] if args.layers == "half" else parse_layers(args.layers, n_layers)
    return LoraConfig(r=args.rank, lora_alpha=args.alpha, use_rslora=args.rslora, lora_dropout=0.0, bias="none",
                      target_modules=ALL_MODULES if args.modules == "all" else ["down_proj"],
                      layers_to_transform=layers, task_type="CAUSAL_LM"), layers


def micro_batches(n_train, batch_size, epochs, seed):
    """The whole run's micro-batches, fixed by the seed, so a resumed run sees exactly the same data order."""
    out, n_epochs = [], math.ceil(epochs)
    for e in range(n_epochs):
        order = list(range(n_train))
        random.Random(seed + e).shuffle(order)
        if e + 1 > epochs:  # a fractional last epoch
            order = order[:round((epochs - e) * n_train)]
        out += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return out


def batch_loss(model, tok, examples, idx, device):
    """Summed token loss of one micro-batch and its number of supervised tokens (right padding, by mask)."""
    ids, mask = pad_batch([examples[i][0] for i in idx], tok.pad_token_id)
    labels, _ = pad_batch([examples[i][1] for i in idx], -100)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=ids, attention_mask=mask).logits
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                             ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum()), int(mask.sum())


@torch.no_grad()
def eval_loss(model, tok, examples, batch_size, device):
    model.eval()
    total, n = 0.0, 0
    for b in range(0, len(examples), batch_size):
        loss, k, _ = batch_loss(model, tok, examples, list(range(b, min(b + batch_size, len(examples)))), device)
        total, n = total + loss.item(), n + k
    model.train()
    return total / max(n, 1)


def make_optimizer(args, params, device):
    use8 = args.optim == "adamw8bit" or (args.optim == "auto" and device.type == "cuda")
    if use8:
        if device.type != "cuda":
            raise InputError("--optim adamw8bit needs a CUDA GPU (bitsandbytes)")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay), "adamw8bit"
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay), "adamw"


def save_checkpoint(model, opt, sched, step, totals, out):
    """checkpoints/step_N: a loadable adapter, the optimiser state and the run's running totals (tokens, seconds),
    written to a temp dir then renamed."""
    final = Path(out) / "checkpoints" / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **totals},
               tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def last_checkpoint(out):
    ckpts = [p for p in (Path(out) / "checkpoints").glob("step_*") if (p / "trainer_state.pt").exists()]
    return max(ckpts, key=lambda p: int(p.name.split("_")[1]), default=None)


def check_same_settings(old, new, out):
    """--resume under any other setting would silently splice two different runs into one, so every stored setting
    must match; only --out (the run may have moved) and --resume itself may differ."""
    new = json.loads(json.dumps(new))  # compare values as stored (tuples become lists, and so on)
    for k in [*new, *(k for k in old if k not in new)]:
        if k not in ("out", "resume") and old.get(k) != new.get(k):
            raise InputError(f"{out}: --resume with a different {k} than the original run "
                             f"({json.dumps(old.get(k))} -> {json.dumps(new.get(k))})")


def load_adapter_strictly(model, path):
    """Load a checkpoint's LoRA weights; PEFT's own loader ignores missing and unexpected keys, so check them."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(path)
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    got = {k: tuple(v.shape) for k, v in saved.items()}
    for k in sorted(want.keys() | got.keys()):
        if want.get(k) != got.get(k):
            what = "lacks" if k not in got else "has unexpected" if k not in want else f"has shape {got[k]} for"
            raise InputError(f"{path}: checkpoint {what} {k} (it does not fit the adapter being trained)")
    set_peft_model_state_dict(model, saved)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    finished = (out / "adapter_model.safetensors").exists()
    if not args.resume and out.exists() and any(out.iterdir()):
        raise InputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    # Everything that can be wrong with the input is checked before --out is created.
    messages = load_examples(args.data)
    model, tok = load_model(args.model, load_in_4bit=args.load_in_4bit)
    n_layers = len(decoder_layers(model))
    config, layers = lora_config(args, n_layers)
    examples = [tokenize(tok, m, args.max_seq_len) for m in messages]
    rng = random.Random(args.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if args.max_examples:
        order = order[:args.max_examples]
    n_eval = int(len(order) * args.eval_frac) if len(order) > 1 else 0
    eval_set = [examples[i] for i in order[:n_eval]]
    train_set = [examples[i] for i in order[n_eval:]]
    batches = micro_batches(len(train_set), args.batch_size, args.epochs, args.seed)
    total_steps = math.ceil(len(batches) / args.grad_accum)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import get_linear_schedule_with_warmup

    device = input_device(model)
    torch.manual_seed(args.seed)
    if args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights in fp32; bf16 autocast does the matmuls on CUDA
    opt, optim_name = make_optimizer(args, params, device)
    sched = get_linear_schedule_with_warmup(opt, args.warmup_steps, total_steps)

    run_config = {**{k: v for k, v in vars(args).items()}, "resolved_layers": layers, "n_layers": n_layers,
                  "n_train": len(train_set), "n_eval": len(eval_set), "total_steps": total_steps,
                  "optimizer": optim_name, "data_sha256": sha256_file(args.data), "lora_scale":
                  args.alpha / (math.sqrt(args.rank) if args.rslora else args.rank)}
    log_path = out / "train_log.jsonl"
    if args.resume and (out / "run_config.json").exists():
        check_same_settings(json.loads((out / "run_config.json").read_text()), run_config, out)
    if finished:
        print(f"{out}: already finished, nothing to resume")
        return
    step, totals = 0, {"tokens": 0, "seconds": 0.0}
    ckpt = last_checkpoint(out) if args.resume else None
    if ckpt:
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        load_adapter_strictly(model, ckpt / "adapter_model.safetensors")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        # checkpoints written before running totals were kept count only from here on
        totals = {k: state.get(k, v) for k, v in totals.items()}
        # steps logged after the checkpoint are redone, so drop them: the log stays continuous
        old_log = read_jsonl(log_path, tolerate_torn_tail=True) if log_path.exists() else []
        write_jsonl(log_path, [r for r in old_log if r["step"] <= step])
        print(f"resuming from {ckpt} (step {step}/{total_steps})")
    else:
        write_jsonl(log_path, [])
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_json(out / "run_config.json", run_config)

    from tqdm import tqdm

    model.train()
    t0, seconds0 = time.time(), totals["seconds"]
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step")
    while step < total_steps:
        group = batches[step * args.grad_accum:(step + 1) * args.grad_accum]
        n_sup = sum(int(sum(l != -100 for l in train_set[i][1][1:])) for idx in group for i in idx)
        loss_sum = 0.0
        for idx in group:
            loss, _, n_tok = batch_loss(model, tok, train_set, idx, device)
            (loss / max(n_sup, 1)).backward()  # token-weighted mean over the whole optimiser step
            loss_sum += loss.item()
            totals["tokens"] += n_tok
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        row = {"step": step, "epoch": round(step * args.grad_accum * args.batch_size / max(len(train_set), 1), 4),
               "loss": loss_sum / max(n_sup, 1), "lr": lr, "grad_norm": grad_norm, "tokens": n_sup}
        if eval_set and ((args.eval_every and step % args.eval_every == 0) or step == total_steps):
            row["eval_loss"] = eval_loss(model, tok, eval_set, args.batch_size, device)
        append_jsonl(log_path, [row])
        totals["seconds"] = seconds0 + time.time() - t0
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(model, opt, sched, step, totals, out)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        bar.update(1)
    bar.close()

    # The final adapter is written last and atomically: its presence means the run finished.
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".final-"))
    model.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    shutil.rmtree(tmp)
    # The log holds every step of the whole run (a resume drops only the steps it redoes), the totals every segment.
    rows = read_jsonl(log_path)
    first_loss, last_loss = (rows[0]["loss"], rows[-1]["loss"]) if rows else (None, None)
    ev = rows[-1].get("eval_loss") if rows else None
    seconds = totals["seconds"]
    summary = {"steps": step, "first_loss": first_loss, "final_loss": last_loss, "eval_loss": ev,
               "tokens": totals["tokens"], "seconds": round(seconds, 1),
               "tokens_per_s": round(totals["tokens"] / max(seconds, 1e-9), 1)}
    write_json(out / "train_summary.json", summary)
    print(f"trained {out}: {step} steps, {len(layers)} layers x {args.modules} r={args.rank}, loss "
          f"{first_loss if first_loss is None else round(first_loss, 3)} -> "
          f"{last_loss if last_loss is None else round(last_loss, 3)}, eval_loss {ev and round(ev, 3)}, "
          f"{summary['tokens_per_s']} tok/s")


if __name__ == "__main__":
    cli(main)
