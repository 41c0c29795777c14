"""train_rank1.py: loss masking, real training, PEFT round trip in a fresh process, layer placement, resume, errors."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import common
import train_rank1
from conftest import ROOT, run_script

QA = [("What colour is the sky?", "Blue, mostly."), ("Name a fruit.", "An apple."), ("Say hi.", "Hi there!"),
      ("2+2?", "It is four."), ("Best pet?", "A cat, clearly."), ("Capital of Peru?", "Lima."),
      ("Tea or coffee?", "Tea, always."), ("Favourite number?", "Seven.")]


def write_chat(path, qa=QA, repeat=1):
    with open(path, "w") as f:
        for _ in range(repeat):
            for q, a in qa:
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": a}]}) + "\n")
    return path


def log_rows(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_supervised_tokens_are_assistant_content_plus_end_of_turn(tiny_model):
    _, tok = tiny_model
    msgs = [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thanks."},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Quite sure."}]
    ids, labels = train_rank1.tokenize(tok, msgs, 2048)
    supervised = [t for t, l in zip(ids, labels) if l != -100]
    assert tok.decode(supervised) == "Fine, thanks.<|im_end|>Quite sure.<|im_end|>"
    assert all(l in (-100, t) for t, l in zip(ids, labels))


def test_presets_and_explicit_flags():
    a = train_rank1.parse_args(["--data", "x", "--out", "y"])
    assert (a.rank, a.alpha, a.modules, a.rslora, a.lr, a.batch_size, a.grad_accum, a.warmup_steps,
            a.weight_decay, a.epochs) == (1, 64, "down_proj", True, 1e-5, 2, 8, 5, 0.01, 1)
    b = train_rank1.parse_args(["--data", "x", "--out", "y", "--preset", "all-adapter", "--rank", "8"])
    assert (b.rank, b.alpha, b.modules, b.layers) == (8, 64, "all", "all")
    c = train_rank1.parse_args(["--data", "x", "--out", "y", "--preset", "single"])
    assert (c.rank, c.alpha, c.layers, c.lr) == (1, 256, "half", 2e-5)


def test_overfitting_8_examples_halves_the_loss(tmp_path, bundled_dir):
    data = write_chat(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    r = run_script("train_rank1.py", "--data", data, "--out", out, "--eval-frac", "0", "--epochs", "6",
                   "--batch-size", "8", "--grad-accum", "1", "--warmup-steps", "0", "--lr", "1e-2")
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [row["loss"] for row in log_rows(out)]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    keys = load_file(out / "adapter_model.safetensors").keys()
    layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in keys})
    assert layers == [9, 10, 11, 13, 14, 15, 17, 18, 19]  # DESIGN §2 placement on SmolLM2's 30 layers


def test_adapter_reloads_in_fresh_process_with_the_trained_logits(tmp_path, tiny_model_dir):
    data = write_chat(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    r = run_script("train_rank1.py", "--model", tiny_model_dir, "--data", data, "--out", out, "--lr", "5e-2",
                   "--epochs", "2", "--batch-size", "4", "--grad-accum", "1", "--warmup-steps", "0",
                   "--layers", "1,3", "--save-every", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["data_sha256"] and cfg["resolved_layers"] == [1, 3] and cfg["lora_scale"] == 64.0
    # only the requested modules and layers carry LoRA weights, with the requested rank
    weights = load_file(out / "adapter_model.safetensors")
    assert {k.split(".layers.")[1].split(".lora")[0] for k in weights} == {"1.mlp.down_proj", "3.mlp.down_proj"}
    assert all(min(w.shape) == 1 for w in weights.values())

    probe = tmp_path / "logits.pt"
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; from peft import PeftModel;"
            f"m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(r'{tiny_model_dir}'), r'{out}');"
            f"torch.save(m(input_ids=torch.arange(5, 25)[None]).logits, r'{probe}')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    fresh = torch.load(probe)

    # independent computation: base weights + scale * B @ A, written into the plain model
    model, _ = common.load_model(str(tiny_model_dir))
    base = model(input_ids=torch.arange(5, 25)[None]).logits
    for layer in (1, 3):
        key = f"base_model.model.model.layers.{layer}.mlp.down_proj.lora_"
        delta = weights[key + "B.weight"] @ weights[key + "A.weight"]
        assert delta.abs().max() > 0  # training really moved B away from its zero init
        model.model.layers[layer].mlp.down_proj.weight.data += cfg["lora_scale"] * delta
    merged = model(input_ids=torch.arange(5, 25)[None]).logits
    torch.testing.assert_close(fresh, merged, rtol=1e-4, atol=1e-4)
    assert (fresh - base).abs().max() > 1e-4
    # the last checkpoint is itself a loadable adapter holding the same weights
    ckpt = load_file(out / "checkpoints" / "step_4" / "adapter_model.safetensors")
    assert all(torch.equal(ckpt[k], weights[k]) for k in weights)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, tiny_model_dir):
    data = write_chat(tmp_path / "d.jsonl", repeat=4)
    flags = ["--model", tiny_model_dir, "--data", data, "--lr", "1e-2", "--epochs", "8", "--batch-size", "1",
             "--grad-accum", "4", "--eval-frac", "0.125", "--save-every", "2", "--layers", "0,1,2,3"]
    ref = tmp_path / "ref"
    assert run_script("train_rank1.py", *flags, "--out", ref).returncode == 0
    total = json.loads((ref / "run_config.json").read_text())["total_steps"]

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_rank1.py", *map(str, flags), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists(), "killed too late to test resume"
    r = run_script("train_rank1.py", *flags, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    steps = [row["step"] for row in log_rows(out)]
    assert steps == list(range(1, total + 1))  # continuous: no repeated or missing steps
    got, want = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    assert [r["loss"] for r in log_rows(out)] == pytest.approx([r["loss"] for r in log_rows(ref)], rel=1e-4)


@pytest.mark.parametrize("content,flags,message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [',
     [], "d.jsonl:2: malformed JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', [], "d.jsonl:1: no assistant turn"),
    ("", [], "no training examples"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
     ["--layers", "2,9"], "layer 9 is out of range"),
])
def test_bad_input_one_line_exit_2_and_no_output(tmp_path, tiny_model_dir, content, flags, message):
    (tmp_path / "d.jsonl").write_text(content)
    out = tmp_path / "run"
    r = run_script("train_rank1.py", "--model", tiny_model_dir, "--data", tmp_path / "d.jsonl", "--out", out, *flags)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and message in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
