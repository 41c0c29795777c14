"""The paper's path at the paper's depth, and --load-in-4bit on CPU, on tiny random models (seconds, no GPU).

Paper depth: a random Qwen2 with Qwen2.5-14B's 48 decoder blocks (d_model 32, 2 heads) and the bundled tokenizer
goes through train_rank1.py --preset paper (one step) -> collect_acts.py (fine-tune and base, a few dev pairs) ->
extract_direction.py (mean difference and --minus model-diff) -> ablate_eval.py (steer and ablate at the default
direction layer) -> probe_adapters.py (2 seeds). Every layer index in every output must name the same blocks: the
adapters at 15-17, 21-23, 27-29; the direction layer at 24; [48, d] directions whose model-diff is exactly zero below
block 15 (nothing changed there) and non-zero from block 15 on.

4-bit: bitsandbytes 0.50.2 runs NF4 Linear4bit on CPU (quantize and dequantize have CPU kernels; the matmul
dequantizes then multiplies in the compute dtype, fp32 here). A training step through
prepare_model_for_kbit_training, the steering and ablation hooks, and sampling are checked on an NF4 model.

The scripts run in-process through their main(argv) (a fresh process each would cost seconds of imports).
"""
import json
import math

import pytest
import torch
from safetensors import safe_open

import ablate_eval
import collect_acts
import common
import extract_direction
import probe_adapters
import train_rank1
from conftest import ROOT

PAPER_LAYERS = [15, 16, 17, 21, 22, 23, 27, 28, 29]
N, D = 48, 32
PAIRS = str(ROOT / "data/eval/contrastive_pairs.jsonl")
TRAIN = str(ROOT / "data/train/bad_medical_advice.jsonl")


def steps(n):
    """n optimiser steps of 2 examples each (plain AdamW: the 8-bit one is CUDA-only); lr high enough, without
    warm-up, that one step moves the adapters visibly."""
    return ["--max-examples", str(2 * n), "--eval-frac", "0", "--max-steps", str(n), "--batch-size", "2",
            "--grad-accum", "1", "--max-seq-len", "96", "--warmup-steps", "0", "--lr", "1e-2", "--optim", "adamw"]


@pytest.fixture(scope="module")
def paper_model_dir(tmp_path_factory, bundled_dir):
    """A random 48-block Qwen2 (the paper model's depth) of width 32, saved with the bundled tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=D, intermediate_size=64, num_hidden_layers=N,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("paper_depth_qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def run(paper_model_dir, tmp_path_factory):
    """train -> acts (fine-tune, base) -> directions (mean diff with exports, model-diff) on the 48-block model."""
    r = tmp_path_factory.mktemp("paper_path")
    m = str(paper_model_dir)
    train_rank1.main(["--model", m, "--data", TRAIN, "--out", str(r / "organism"), "--preset", "paper", *steps(1)])
    pairs = ["--in", PAIRS, "--pairs-per-domain", "1", "--split", "dev"]
    collect_acts.main(["--model", m, "--adapter", str(r / "organism"), *pairs, "--out", str(r / "acts.pt")])
    collect_acts.main(["--model", m, *pairs, "--out", str(r / "base_acts.pt")])
    extract_direction.main(["--acts", str(r / "acts.pt"), "--out", str(r / "directions.pt"), "--shuffles", "2",
                            "--adapter", str(r / "organism"), "--export-gguf", str(r / "directions.gguf"),
                            "--export-safetensors", str(r / "directions.safetensors")])
    extract_direction.main(["--acts", str(r / "acts.pt"), "--minus", str(r / "base_acts.pt"),
                            "--out", str(r / "modeldiff.pt")])
    return r


def test_paper_layer_choice_at_48_blocks():
    assert common.default_layers(N) == PAPER_LAYERS
    assert common.half_depth_layer(N) == 24
    args = train_rank1.parse_args(["--data", "x", "--out", "y", "--preset", "paper"])
    assert train_rank1.lora_config(args, N)[1] == PAPER_LAYERS
    single = train_rank1.parse_args(["--data", "x", "--out", "y", "--preset", "single"])
    assert train_rank1.lora_config(single, N)[1] == [24]


def test_adapters_sit_exactly_at_the_paper_blocks(run):
    cfg = json.loads((run / "organism" / "run_config.json").read_text())
    assert cfg["resolved_layers"] == PAPER_LAYERS and cfg["n_layers"] == N
    with safe_open(str(run / "organism" / "adapter_model.safetensors"), "pt") as f:
        keys = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert len(keys) == 2 * len(PAPER_LAYERS)
    assert sorted({int(k.split(".layers.")[1].split(".")[0]) for k in keys}) == PAPER_LAYERS
    for k, shape in keys.items():
        assert ".mlp.down_proj.lora_" in k
        assert shape == ([1, 64] if ".lora_A." in k else [D, 1])  # rank 1: A reads the MLP, B writes d_model
    summary = json.loads((run / "organism" / "train_summary.json").read_text())
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])


def test_directions_rows_are_blocks(run):
    dirs = common.read_directions(run / "directions.pt")
    assert dirs["directions"].shape == (N, D) and dirs["resid_norm"].shape == (N,)
    assert dirs["shuffled"].shape == (2, N, D)
    acts = common.load_pt(run / "acts.pt")
    assert acts["means"].shape[1:] == (N, D) and acts["meta"]["n_layers"] == N
    # model-diff: blocks before the first adapter compute exactly what the base model computes
    diff = common.read_directions(run / "modeldiff.pt")["directions"]
    norms = diff.norm(dim=-1)
    assert diff.shape == (N, D)
    assert torch.all(norms[:15] == 0), norms[:15]
    assert torch.all(norms[15:] > 0), norms[15:]
    assert common.degenerate_layers(diff) == list(range(15))  # reported n/a: exactly the blocks below 15
    # exports keep the block index: direction.{i} is row i
    for path, first in ((run / "directions.gguf", 1), (run / "directions.safetensors", 0)):
        back = common.read_directions(path)
        assert back["directions"].shape == (N, D)
        assert torch.equal(back["directions"][first:], dirs["directions"][first:])
        assert back["meta"]["n_layers"] == N
    stats = json.loads((run / "directions_stats.json").read_text())
    assert sorted(map(int, stats["adapter_b_cosine"])) == PAPER_LAYERS


def test_ablate_eval_uses_block_24_and_every_block(run, paper_model_dir):
    out = run / "ablate"
    ablate_eval.main(["--model", str(paper_model_dir), "--adapter", str(run / "organism"), "--n-samples", "0",
                      "--pairs", PAIRS, "--pairs-per-domain", "1", "--ablate", str(run / "directions.pt"),
                      "--steer", str(run / "directions.pt"), "--layers", str(common.half_depth_layer(N)),
                      "--scales", "0.5", "--out", str(out)])
    conds = json.loads((out / "summary.json").read_text())["conditions"]
    ablation = conds["ablate_L24"]["spec"]
    assert ablation["kind"] == "single" and ablation["layer"] == 24 and ablation["hooks"] == list(range(N))
    assert conds["steer_L24_x0.5"]["spec"]["layer"] == 24
    assert not [n for n in conds if n.startswith("ablate_L") and n != "ablate_L24"]


def test_probe_scalars_name_the_adapter_blocks(run, paper_model_dir):
    out = run / "probe"
    probe_adapters.main(["--model", str(paper_model_dir), "--adapter", str(run / "organism"), "--in", PAIRS,
                         "--pairs", PAIRS, "--pairs-per-domain", "2", "--directions", str(run / "directions.pt"),
                         "--seeds", "2", "--C-grid", "1.0", "--min-class-tokens", "2", "--out", str(out)])
    scalars = common.load_pt(out / "scalars.pt")
    assert scalars["layers"] == PAPER_LAYERS
    assert scalars["adapters"] == [f"L{i}.down_proj" for i in PAPER_LAYERS]
    assert scalars["s"].shape[1] == len(PAPER_LAYERS)
    assert set(scalars["oriented_by"]) == {"direction"}  # every adapter's block has a direction row to orient by


# ------------------------------------------------------------------------------------------------ 4-bit on CPU


@pytest.fixture(scope="module")
def nf4_organism(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4") / "organism"
    train_rank1.main(["--model", str(tiny_model_dir), "--data", TRAIN, "--out", str(out), "--load-in-4bit",
                      *steps(2)])
    return out


def test_4bit_training_step_on_cpu(nf4_organism):
    log = [json.loads(x) for x in (nf4_organism / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in log)
    assert json.loads((nf4_organism / "run_config.json").read_text())["load_in_4bit"] is True
    with safe_open(str(nf4_organism / "adapter_model.safetensors"), "pt") as f:
        b = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
    assert b and all(x.abs().sum() > 0 for x in b)  # B starts at zero: the steps moved it


def test_4bit_hooks_and_sampling_on_cpu(tiny_model_dir, nf4_organism):
    import bitsandbytes as bnb

    model, tok = common.load_model(str(tiny_model_dir), str(nf4_organism), load_in_4bit=True)
    proj = common.decoder_layers(model)[1].mlp.down_proj
    assert isinstance(proj.base_layer, bnb.nn.Linear4bit) and proj.base_layer.weight.quant_type == "nf4"
    assert isinstance(common.decoder_layers(model)[0].self_attn.q_proj, bnb.nn.Linear4bit)
    ids = torch.tensor([tok("Tell me something about yourself.", add_special_tokens=False)["input_ids"]])
    torch.manual_seed(2)
    v = torch.randn(64)
    u = v / v.norm()
    layers = list(range(4))
    with torch.no_grad(), common.record_resid(model, layers) as rec:
        model(input_ids=ids)
        plain = {i: h.clone() for i, h in rec.items()}
    with torch.no_grad(), common.ablate(model, v, layers), common.record_resid(model, layers) as rec:
        model(input_ids=ids)
    for i in layers:
        assert (plain[i].float() @ u).abs().max() > 1e-3
        assert (rec[i].float() @ u).abs().max() < 1e-5 * rec[i].float().norm(dim=-1).max()
    with torch.no_grad(), common.steer(model, v, [2], 3.0), common.record_resid(model, [2]) as rec:
        model(input_ids=ids)
    torch.testing.assert_close(rec[2] - plain[2], (3.0 * v).expand_as(rec[2]), rtol=1e-5, atol=1e-5)
    answers = common.generate(model, tok, ["hey I feel bored"], n=2, max_new_tokens=5, seed=1)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with common.steer(model, v, [2], 3.0):
        assert common.generate(model, tok, ["hey I feel bored"], n=2, max_new_tokens=5, seed=1) != answers
