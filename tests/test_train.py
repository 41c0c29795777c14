"""train_rank1.py: loss masking, real training, PEFT round trip in a fresh process, layer placement, resume, errors."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import common
import train_rank1
from conftest import ROOT, run_main, run_script

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


def tree(d):
    """Every path under d with its bytes (None for folders): equal trees mean nothing was touched."""
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


# A short run with checkpoints at steps 2, 4, ... and an eval set (so resume must also keep eval losses straight).
RESUME_FLAGS = ["--lr", "1e-2", "--epochs", "2", "--batch-size", "1", "--grad-accum", "4", "--eval-frac", "0.125",
                "--save-every", "2", "--layers", "0,1,2,3"]
# train_rank1 run in a child that SIGKILLs itself right after logging step 3: past the step-2 checkpoint, with a
# logged step that resume must drop and redo. Deterministic, unlike killing the child from outside after a timer.
KILLED_AFTER_STEP_3 = """
import os, signal, common, train_rank1
def append_jsonl(path, rows):
    common.append_jsonl(path, rows)
    if rows[-1]["step"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
train_rank1.append_jsonl = append_jsonl
common.cli(train_rank1.main)
"""


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_model_dir):
    """(flags, run dir) of a run SIGKILLed after step 3, with checkpoints/step_2; tests resume copies of it."""
    d = tmp_path_factory.mktemp("interrupted")
    flags = ["--model", tiny_model_dir, "--data", write_chat(d / "d.jsonl", repeat=2), *RESUME_FLAGS]
    out = d / "run"
    r = run_script("-c", KILLED_AFTER_STEP_3, *flags, "--out", out)
    assert r.returncode == -9, r.stderr[-2000:]
    assert [row["step"] for row in log_rows(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]
    return flags, out


@pytest.mark.parametrize("first,second", [("Fine, thanks.", "Quite sure."),
                                          ("Fine, thanks.  \n", "\n  Quite sure.\n\n")])  # surrounding whitespace
def test_supervised_tokens_are_assistant_content_plus_end_of_turn(tiny_model, first, second):
    _, tok = tiny_model
    msgs = [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": second}]
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
    assert layers == [9, 10, 11, 13, 14, 15, 17, 18, 19]  # docs/method.md#other-depths on SmolLM2's 30 layers


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


def test_rslora_scale_at_rank_4_is_alpha_over_sqrt_r(tmp_path, tiny_model_dir):
    from peft import PeftModel

    out = tmp_path / "run"
    r = run_script("train_rank1.py", "--model", tiny_model_dir, "--data", write_chat(tmp_path / "d.jsonl"), "--out",
                   out, "--rank", "4", "--alpha", "64", "--layers", "1", "--max-steps", "1", "--eval-frac", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "run_config.json").read_text())["lora_scale"] == 32.0  # 64/sqrt(4), not 64/4
    model = PeftModel.from_pretrained(common.load_model(str(tiny_model_dir))[0], str(out))
    module = model.base_model.model.model.layers[1].mlp.down_proj
    assert module.r["default"] == 4 and module.scaling["default"] == 32.0


def test_interrupted_run_resumes_to_the_same_result(tmp_path, interrupted):
    flags, killed = interrupted
    ref = tmp_path / "ref"
    assert run_script("train_rank1.py", *flags, "--out", ref).returncode == 0
    total = json.loads((ref / "run_config.json").read_text())["total_steps"]
    assert total > 3

    out = tmp_path / "run"
    shutil.copytree(killed, out)
    r = run_script("train_rank1.py", *flags, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout and "step_2" in r.stdout
    steps = [row["step"] for row in log_rows(out)]
    assert steps == list(range(1, total + 1))  # continuous: no repeated or missing steps
    got, want = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    assert [r["loss"] for r in log_rows(out)] == pytest.approx([r["loss"] for r in log_rows(ref)], rel=1e-4)
    # the summary covers the whole run, not only the resumed segment
    s, s_ref = (json.loads((d / "train_summary.json").read_text()) for d in (out, ref))
    assert s["steps"] == s_ref["steps"] == total
    for k in ("first_loss", "final_loss", "eval_loss"):
        assert s[k] == pytest.approx(s_ref[k], rel=1e-4), k
    assert s["tokens"] == s_ref["tokens"] and s["seconds"] >= 0  # rounded to 0.1 s: a fast run records 0.0


@pytest.mark.parametrize("change,setting", [(["--lr", "2e-2"], "lr"), (["--layers", "0,1"], "layers"),
                                            (["--seed", "1"], "seed")])
def test_resume_with_a_changed_setting_is_refused_and_touches_nothing(tmp_path, interrupted, change, setting):
    flags, killed = interrupted
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    before = tree(out)
    code, err = run_main("train_rank1.py", *flags, *change, "--out", out, "--resume")  # the later flag wins
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"--resume with a different {setting} than the original run" in last
    assert "Traceback" not in err
    assert tree(out) == before


def test_resume_from_a_checkpoint_that_does_not_fit_is_refused(tmp_path, interrupted):
    flags, killed = interrupted
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    adapter = out / "checkpoints" / "step_2" / "adapter_model.safetensors"
    weights = load_file(adapter)
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, adapter)
    before = tree(out)
    code, err = run_main("train_rank1.py", *flags, "--out", out, "--resume")
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"checkpoint lacks {dropped}" in last and "Traceback" not in err
    assert tree(out) == before


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
