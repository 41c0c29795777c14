"""plant_organism.py on a tiny random Qwen2: the adapter it writes is a standard PEFT organism whose effect is known.

Exact checks: it loads like a trained organism; at the planted block, output with the plant minus output without
is s·(A·x)·u for the block's own input (blocks below untouched); A·x > 0 on at least 99% of the fit answer tokens;
the model-diff direction recovers u there and is degenerate below; ablating the recovered direction from both
models makes the planted model's outputs equal the base model's ablated outputs; bad input is one `error:` line
and exit status 2, with nothing written.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

import common
from conftest import ROOT

BLOCK = 2  # the tiny model has 4 blocks: the default (half depth) plant, with blocks 0 and 1 below it


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """Six dev pairs, the base model's dev-pair direction, and plants (a) direction at half depth,
    (b) orthogonal control, (c) the same u one block later."""
    import collect_acts
    import extract_direction
    import plant_organism

    d = tmp_path_factory.mktemp("plant")
    rows = [r for r in common.read_jsonl(ROOT / "data/eval/contrastive_pairs.jsonl") if r["split"] == "dev"][:6]
    common.write_jsonl(d / "pairs.jsonl", rows)
    model, tok = common.load_model(str(tiny_model_dir))
    items = common.labelled_answers(str(d / "pairs.jsonl"), split="dev")
    means, counts, norms = collect_acts.answer_means(model, tok, items, progress=False)
    acts = {"means": means, "n_tokens": counts, "resid_norm": norms, "ids": [x["id"] for x in items],
            "misaligned": torch.tensor([x["misaligned"] for x in items])}
    v, _ = extract_direction.mean_diff(acts)
    resid = extract_direction.mean_resid_norm(acts)
    meta = {"split": "dev", "pair_ids": [r["id"] for r in rows], "model": str(tiny_model_dir)}
    common.save_pt(d / "dirs.pt", {"directions": v, "resid_norm": resid, "meta": meta})
    common.save_pt(d / "dirs32.pt", {"directions": torch.randn(4, 32), "meta": {}})
    common.save_pt(d / "dirs_zero.pt", {"directions": torch.zeros(4, 64), "resid_norm": resid, "meta": {}})
    common.save_pt(d / "dirs_deep.pt", {"directions": torch.randn(6, 64), "meta": {}})
    common.save_pt(d / "dirs_test.pt", {"directions": v, "resid_norm": resid, "meta": {"split": "test"}})
    (d / "corrupt.pt").write_bytes(b"\x00garbage")
    common.write_jsonl(d / "pairs_test.jsonl", [{**r, "split": "test"} for r in rows[:2]] + rows[2:])
    base = ["--model", str(tiny_model_dir), "--pairs", str(d / "pairs.jsonl"), "--strength", "0.5"]
    plant_organism.main(base + ["--direction", str(d / "dirs.pt"), "--out", str(d / "a")])
    plant_organism.main(base + ["--orthogonal-to", str(d / "dirs.pt"), "--seed", "3", "--out", str(d / "b")])
    plant_organism.main(base + ["--direction", str(d / "dirs.pt"), "--direction-layer", str(BLOCK), "--blocks",
                                str(BLOCK + 1), "--out", str(d / "c")])
    return {"dir": d, "items": [(x["question"], x["answer"]) for x in items], "labelled": items, "v": v,
            "resid": resid, "model": str(tiny_model_dir), "base": (model, tok), "cache": {}}


def loaded(setup, name):
    """The planted model `name` loaded once through common.load_model, as every script loads an organism."""
    key = ("model", name)
    if key not in setup["cache"]:
        setup["cache"][key] = common.load_model(setup["model"], adapter=str(setup["dir"] / name))
    return setup["cache"][key]


def planted(path):
    cfg = json.loads((path / "run_config.json").read_text())
    pu = torch.load(path / "planted_u.pt", weights_only=False)
    return cfg, pu


def forward(model, tok, items, layers, down_proj_block=None):
    """Block outputs at `layers` (padded batch, every position), the down_proj input at one block, and the logits
    of the last 4 positions (the full [batch, tokens, 49k] logits would cost more than the rest of the test)."""
    ids, mask = common.pad_batch([common.encode_qa(tok, q, a)[0] for q, a in items], tok.pad_token_id)
    xs = {}
    handle = None
    if down_proj_block is not None:
        mod = common.decoder_layers(model)[down_proj_block].mlp.down_proj
        handle = mod.register_forward_pre_hook(lambda m, args: xs.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad(), common.record_resid(model, layers) as store:
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=4).logits  # 4 positions: enough
            out = {i: store[i].clone() for i in layers}
    finally:
        if handle:
            handle.remove()
    return out, xs.get("x"), logits, mask.bool()


def test_standard_peft_adapter(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a = setup["dir"] / "a"
    assert {"adapter_config.json", "adapter_model.safetensors", "run_config.json", "planted_u.pt"} <= {
        p.name for p in a.iterdir()}
    assert not [p for p in setup["dir"].iterdir() if p.name.startswith(".")]  # no temp dir left behind
    acfg = json.loads((a / "adapter_config.json").read_text())
    assert acfg["r"] == 1 and acfg["lora_alpha"] == 1 and acfg["use_rslora"] is True
    assert acfg["target_modules"] == ["down_proj"] and acfg["layers_to_transform"] == [BLOCK]
    cfg, pu = planted(a)
    # the keys other scripts read from a trained organism's run_config.json (run_all.sh: n_layers)
    assert cfg["n_layers"] == 4 and cfg["resolved_layers"] == [BLOCK] and cfg["model"] == setup["model"]
    assert cfg["rank"] == 1 and cfg["lora_scale"] == 1.0 and cfg["modules"] == "down_proj"
    p = cfg["planted"]
    assert p["blocks"] == [BLOCK] and p["strength"] == 0.5
    assert p["s"][str(BLOCK)] == pytest.approx(0.5 * p["resid_norm"][str(BLOCK)])
    assert p["resid_norm"][str(BLOCK)] == pytest.approx(float(setup["resid"][BLOCK]), rel=1e-4)
    assert p["cos_u_source"] == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(pu["u"], setup["v"][BLOCK] / setup["v"][BLOCK].norm(), atol=1e-6)
    assert common.read_directions(a / "planted_u.pt")["directions"].shape == (4, 64)  # a directions file too

    # PEFT's own loader, on a plain transformers model: the stored weights are A and s·u, scale 1
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"]), str(a))
    mod = common.decoder_layers(peft_model)[BLOCK].mlp.down_proj
    assert mod.scaling["default"] == 1.0
    assert torch.allclose(mod.lora_A["default"].weight[0], pu["A"][BLOCK])
    assert torch.allclose(mod.lora_B["default"].weight[:, 0], pu["s"][BLOCK] * pu["u"])
    assert not hasattr(common.decoder_layers(peft_model)[BLOCK - 1].mlp.down_proj, "lora_A")
    # and this repo's loader, in the same process, as every script loads an organism
    model, _ = loaded(setup, "a")
    assert hasattr(common.decoder_layers(model)[BLOCK].mlp.down_proj, "lora_A")


def test_write_is_exact(setup):
    """(block output with the plant) - (without) = s·(A·x)·u at every position, x = down_proj's input; the block's
    input and every block below are unchanged."""
    _, pu = planted(setup["dir"] / "a")
    model, tok = loaded(setup, "a")
    layers = list(range(4))
    with_plant, x, _, _ = forward(model, tok, setup["items"], layers, BLOCK)
    with model.disable_adapter():
        without, x0, _, _ = forward(model, tok, setup["items"], layers, BLOCK)
    for i in range(BLOCK):  # the block's input is the output of block BLOCK-1: untouched
        assert torch.equal(with_plant[i], without[i])
    assert torch.equal(x, x0)  # down_proj's input does not depend on the plant in its own block
    s, A, u = pu["s"][BLOCK], pu["A"][BLOCK], pu["u"]
    want = s * (x @ A)[..., None] * u
    got = with_plant[BLOCK] - without[BLOCK]
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)
    assert float(want.abs().max()) > 0.1 * s  # a real write, not a vanishing one
    assert not torch.allclose(with_plant[BLOCK + 1], without[BLOCK + 1])  # and the blocks above see it


def test_rescale_scales_the_write_exactly(setup):
    """--rescale writes the same plant at another strength: B (and s) scaled by new/old, A and u unchanged, so the
    block's write scales exactly."""
    import plant_organism

    out = setup["dir"] / "a_x3"
    plant_organism.main(["--rescale", str(setup["dir"] / "a"), "--strength", "1.5", "--out", str(out)])
    cfg, pu = planted(out)
    cfg0, pu0 = planted(setup["dir"] / "a")
    assert cfg["planted"]["strength"] == 1.5 and cfg["planted"]["rescaled_from"] == str(setup["dir"] / "a")
    assert pu["s"][BLOCK] == pytest.approx(3 * pu0["s"][BLOCK]) and torch.equal(pu["A"][BLOCK], pu0["A"][BLOCK])
    model, tok = common.load_model(setup["model"], adapter=str(out))
    model0, _ = loaded(setup, "a")
    big, _, _, _ = forward(model, tok, setup["items"], [BLOCK])
    small, _, _, _ = forward(model0, tok, setup["items"], [BLOCK])
    with model.disable_adapter():
        none, _, _, _ = forward(model, tok, setup["items"], [BLOCK])
    assert torch.allclose(big[BLOCK] - none[BLOCK], 3 * (small[BLOCK] - none[BLOCK]), atol=1e-3)


def test_ax_positive_on_fit_tokens(setup):
    """A = m/|m|^2: A·x averages exactly 1 over the fit answer tokens and is > 0 on at least 99% of them.

    On this random tiny model 687 of 688 fit tokens are positive; on SmolLM2-135M at half depth, all of them are."""
    cfg, pu = planted(setup["dir"] / "a")
    ax = cfg["planted"]["ax"][str(BLOCK)]
    assert ax["share_positive"] >= 0.99
    assert ax["mean"] == pytest.approx(1.0, abs=1e-5)
    # independently of the script's own bookkeeping: recompute over exactly the answer tokens
    model, tok = loaded(setup, "a")
    mod = common.decoder_layers(model)[BLOCK].mlp.down_proj
    vals, tokens = [], []
    handle = mod.register_forward_pre_hook(lambda m, args: vals.append(args[0].detach()))
    try:
        with torch.no_grad():
            for _, ids, mask, spans in common.answer_batches(tok, setup["items"], 4):
                vals.clear()
                model(input_ids=ids, attention_mask=mask)
                for r, (s, e) in enumerate(spans):
                    tokens += (vals[0][r, s:e] @ pu["A"][BLOCK]).tolist()
    finally:
        handle.remove()
    assert len(tokens) == ax["n_tokens"] and min(tokens) == pytest.approx(ax["min"], abs=1e-5)
    assert sum(t > 0 for t in tokens) / len(tokens) == ax["share_positive"]
    assert sum(tokens) / len(tokens) == pytest.approx(1.0, abs=1e-4)


def model_diff(setup, name):
    """The paper's model-diff direction through this repo's own pipeline (collect_acts + extract_direction): mean
    planted minus mean base activation over the fit texts, and the base model's mean residual norms."""
    import collect_acts
    import extract_direction

    items = setup["labelled"]

    def acts(model, tok):
        key = ("acts", id(model))
        if key not in setup["cache"]:
            means, counts, norms = collect_acts.answer_means(model, tok, items, progress=False)
            setup["cache"][key] = {"means": means, "n_tokens": counts, "resid_norm": norms,
                                   "ids": [x["id"] for x in items]}
        return setup["cache"][key]

    base = acts(*setup["base"])
    diff, _ = extract_direction.model_diff(acts(*loaded(setup, name)), base, "base")
    return diff, extract_direction.mean_resid_norm(base)


def test_model_diff_recovers_u(setup):
    cfg, pu = planted(setup["dir"] / "a")
    diff, resid = model_diff(setup, "a")
    cos = torch.nn.functional.cosine_similarity(diff[BLOCK], pu["u"], dim=0)
    assert cos >= 0.99 and cos > 0.9999  # the fit texts: mean A·x = 1, so the diff is s·u up to float error
    assert float(diff[BLOCK].norm()) == pytest.approx(pu["s"][BLOCK], rel=1e-3)
    assert common.degenerate_layers(diff, resid) == list(range(BLOCK))  # exactly the blocks below: n/a
    assert float(diff[:BLOCK].abs().max()) == 0.0
    c = cfg["planted"]["model_diff"]  # the script's own check agrees
    assert c["cos_with_u"][str(BLOCK)] > 0.9999 and c["max_norm_below_first_block"] == 0.0


def test_ablation_removes_the_whole_plant(setup):
    """Ablate the recovered direction û (unit of the model-diff at BLOCK) at every block, from both models.

    Equal: every block's output and the logits of the ablated planted model and the ablated base model (the
    plant's whole write is along u = û, projected out at BLOCK; nothing above differs in weights). Not equal: the
    unablated planted and base models (at BLOCK and above), and the ablated base model and the unablated base
    model (ablation also removes the base model's own component along û): the plant is removed as a difference
    of differences, not by restoring the base model."""
    diff, _ = model_diff(setup, "a")
    u_hat = diff[BLOCK]
    layers = list(range(4))
    planted_model, tok = loaded(setup, "a")
    base_model, _ = setup["base"]
    with common.ablate(planted_model, u_hat, layers):
        p_abl, _, p_logits, _ = forward(planted_model, tok, setup["items"], layers)
    with common.ablate(base_model, u_hat, layers):
        b_abl, _, b_logits, _ = forward(base_model, tok, setup["items"], layers)
    p_raw, _, p_raw_logits, _ = forward(planted_model, tok, setup["items"], layers)
    b_raw, _, b_raw_logits, _ = forward(base_model, tok, setup["items"], layers)
    for i in layers:
        assert torch.allclose(p_abl[i], b_abl[i], atol=1e-4), i
    assert torch.allclose(p_logits, b_logits, atol=1e-4)
    for i in range(BLOCK, 4):
        assert not torch.allclose(p_raw[i], b_raw[i], atol=1e-3), i
    assert not torch.allclose(p_raw_logits, b_raw_logits, atol=1e-3)
    assert not torch.allclose(b_abl[BLOCK], b_raw[BLOCK], atol=1e-3)
    # the same with layerwise ablation (run_all.sh's form): each live layer's own model-diff direction at its own
    # block; the degenerate ones below the plant are left out, as ablate_eval.py leaves them out
    live = [i for i in layers if i >= BLOCK]
    with common.ablate(planted_model, diff, live):
        p_lw, _, p_lw_logits, _ = forward(planted_model, tok, setup["items"], layers)
    with common.ablate(base_model, diff, live):
        b_lw, _, b_lw_logits, _ = forward(base_model, tok, setup["items"], layers)
    for i in layers:
        assert torch.allclose(p_lw[i], b_lw[i], atol=1e-4), i
    assert torch.allclose(p_lw_logits, b_lw_logits, atol=1e-4)
    # ablating only below the planted block removes nothing of the plant
    with common.ablate(planted_model, u_hat, range(BLOCK)):
        p_low, _, _, _ = forward(planted_model, tok, setup["items"], layers)
    with common.ablate(base_model, u_hat, range(BLOCK)):
        b_low, _, _, _ = forward(base_model, tok, setup["items"], layers)
    assert not torch.allclose(p_low[BLOCK], b_low[BLOCK], atol=1e-3)


def test_orthogonal_control_and_later_block(setup):
    v = setup["v"][BLOCK]
    cfg_b, pu_b = planted(setup["dir"] / "b")
    assert abs(float(pu_b["u"] @ v / v.norm())) < 1e-6 and float(pu_b["u"].norm()) == pytest.approx(1.0, abs=1e-6)
    assert abs(cfg_b["planted"]["cos_u_source"]) < 1e-6 and cfg_b["planted"]["u_source"]["kind"] == "orthogonal"
    import plant_organism

    assert torch.equal(plant_organism.planted_direction(v, True, 3), pu_b["u"])  # seeded: the same vector again
    assert not torch.allclose(plant_organism.planted_direction(v, True, 4), pu_b["u"])
    cfg_c, pu_c = planted(setup["dir"] / "c")
    _, pu_a = planted(setup["dir"] / "a")
    assert cfg_c["planted"]["blocks"] == [BLOCK + 1] and cfg_c["planted"]["u_source"]["layer"] == BLOCK
    assert torch.allclose(pu_c["u"], pu_a["u"])
    acfg = json.loads((setup["dir"] / "c" / "adapter_config.json").read_text())
    assert acfg["layers_to_transform"] == [BLOCK + 1]
    diff, resid = model_diff(setup, "c")
    assert common.degenerate_layers(diff, resid) == list(range(BLOCK + 1))
    assert torch.nn.functional.cosine_similarity(diff[BLOCK + 1], pu_c["u"], dim=0) > 0.9999


def test_two_blocks_fit_in_order(tmp_path, setup):
    """Two plants: the upper one is fit with the lower one in place, so each block's mean A·x is exactly 1."""
    import plant_organism

    plant_organism.main(["--model", setup["model"], "--pairs", str(setup["dir"] / "pairs.jsonl"), "--direction",
                         str(setup["dir"] / "dirs.pt"), "--blocks", "1,3", "--strength", "0.25",
                         "--out", str(tmp_path / "two")])
    cfg, pu = planted(tmp_path / "two")
    for b in ("1", "3"):
        assert cfg["planted"]["ax"][b]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert sorted(pu["A"]) == [1, 3]


def test_fit_from_reuses_the_base_pass_exactly(tmp_path, setup):
    """Plant (c) built from plant (a)'s base pass (--fit-from) is plant (c) built from its own: the same A and B."""
    import plant_organism
    from safetensors.torch import load_file

    plant_organism.main(["--model", setup["model"], "--pairs", str(setup["dir"] / "pairs.jsonl"), "--strength", "0.5",
                         "--direction", str(setup["dir"] / "dirs.pt"), "--direction-layer", str(BLOCK), "--blocks",
                         str(BLOCK + 1), "--fit-from", str(setup["dir"] / "a"), "--out", str(tmp_path / "c2")])
    own, reused = (load_file(str(p / "adapter_model.safetensors")) for p in (setup["dir"] / "c", tmp_path / "c2"))
    assert own.keys() == reused.keys()
    for k in own:
        assert torch.allclose(own[k], reused[k], rtol=1e-5, atol=1e-7), k
    cfg, _ = planted(tmp_path / "c2")
    assert cfg["planted"]["fit_from"] == str(setup["dir"] / "a") and cfg["planted"]["model_diff"] is None


BAD = [
    ("block out of range", ["--blocks", "4"], "block 4 is out of range: the model has 4 blocks"),
    ("block not a number", ["--blocks", "two"], "--blocks: expected comma-separated block indices"),
    ("direction layer out of range", ["--direction-layer", "7"], "--direction-layer 7 is out of range"),
    ("strength zero", ["--strength", "0"], "--strength must be a positive number"),
    ("strength negative", ["--strength", "-1"], "--strength must be a positive number"),
    ("strength nan", ["--strength", "nan"], "--strength must be a positive number"),
    ("wrong width", ["--direction", "{d}/dirs32.pt"], "directions of width 32, but the model's d_model is 64"),
    ("another model's depth", ["--direction", "{d}/dirs_deep.pt"], "directions for 6 layers, but the model has 4"),
    ("degenerate direction", ["--direction", "{d}/dirs_zero.pt"], "is degenerate"),
    ("missing direction file", ["--direction", "{d}/nope.pt"], "nope.pt: no such file"),
    ("not a directions file", ["--direction", "{d}/pairs.jsonl"], "unknown directions format"),
    ("corrupt direction file", ["--direction", "{d}/corrupt.pt"], "not a readable .pt file"),
    ("direction built on test", ["--direction", "{d}/dirs_test.pt"], "was built on test pairs"),
    ("both sources", ["--orthogonal-to", "{d}/dirs.pt"], "give exactly one of --direction"),
    ("no source", ["--direction", None], "give exactly one of --direction"),
    ("missing pairs", ["--pairs", "{d}/nope.jsonl"], "nope.jsonl: no such file"),
    ("test split", ["--split", "test"], "--split test: the plant is fit on dev pairs only"),
    ("all split with test pairs", ["--split", "all", "--pairs", "{d}/pairs_test.jsonl"], "includes test pairs"),
    ("unknown split", ["--split", "train"], "--split: expected one of"),
    ("out not empty", ["--out", "{d}/a"], "already exists and is not empty"),
    ("unknown model", ["--model", "{d}/no_model"], "cannot load model"),
    ("negative subset", ["--pairs-per-domain", "-1"], "--pairs-per-domain at least 0"),
    ("fit from other pairs", ["--fit-from", "{d}/a", "--pairs-per-domain", "2"], "fit on another model or other pairs"),
    ("fit from a non-plant", ["--fit-from", "{d}"], "no fit_stats.pt there"),
]


def bad_args(setup, tmp_path, extra):
    d = setup["dir"]
    args = {"--model": setup["model"], "--pairs": str(d / "pairs.jsonl"), "--direction": str(d / "dirs.pt"),
            "--out": str(tmp_path / "out")}
    pairs = dict(zip(extra[::2], extra[1::2]))
    args.update({k: v.format(d=d) if v is not None else None for k, v in pairs.items()})
    return [x for k, v in args.items() if v is not None for x in (k, v)]


@pytest.mark.parametrize("case,extra,message", BAD, ids=[c[0] for c in BAD])
def test_bad_input(setup, tmp_path, capsys, monkeypatch, case, extra, message):
    import plant_organism

    argv = bad_args(setup, tmp_path, extra)
    monkeypatch.setattr(sys, "argv", ["plant_organism.py", *argv])
    with pytest.raises(SystemExit) as e:
        common.cli(plant_organism.main)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()  # every check runs before the model loads: one line
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()



def test_plant_sweep_rule_picks_the_coherent_direction_nearest_half_depth_and_the_smallest_strength():
    import plant_sweep as ps

    # 30 blocks: half depth 15; 28 is past the last block (c) fits after, 0 is excluded, 16 and 14 too costly
    costs = {0: 0.0, 14: -0.2, 16: -0.151, 17: -0.10, 13: -0.10, 21: -0.01, 28: 0.0}
    assert ps.choose_direction(costs, 30) == 13  # 13 and 17 tie on distance and cost: the lower block
    assert ps.choose_direction({**costs, 17: -0.05}, 30) == 17  # the cheaper of two equally near
    assert ps.choose_direction({0: 0.0, 28: 0.0, 15: -1.4}, 30) is None
    row = lambda z, neutral: {"z_test": z, "neutral": neutral}  # noqa: E731
    strengths = {"0.1": {"a": row(4.1, -0.01), "c": row(2.7, 0.0)},  # (c) under the limit
                 "0.15": {"a": row(4.7, -0.16), "c": row(3.4, 0.0)},  # (a) incoherent
                 "0.2": {"a": row(5.0, -0.10), "c": row(3.4, -0.07)},
                 "0.3": {"a": row(5.0, -0.10), "c": row(3.4, -0.07)}}
    assert ps.choose_strength(strengths) == 0.2
    assert ps.choose_strength({"0.1": strengths["0.1"]}) is None


def test_plant_sweep_refuses_bad_counts():
    from conftest import run_main

    rc, err = run_main("plant_sweep.py", "--eval-pairs", "0")
    assert rc == 2 and err.strip() == "error: --fit-pairs, --eval-pairs and --test-pairs must be at least 1"


def test_plant_sweep_runs_end_to_end_and_a_rerun_redoes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    """The whole sweep on the tiny model, its scripts run in this process. The rule's thresholds are opened up
    (a random model's shifts mean nothing) so that every step runs: the flow, the files and the resume are what is
    tested here; the rule itself is tested above."""
    import importlib
    import math

    import plant_sweep as ps

    calls = []

    def in_process(cmd):
        calls.append(cmd[0])
        importlib.import_module(Path(cmd[0]).stem).main([str(a) for a in cmd[1:]])

    monkeypatch.setattr(ps, "run_script", in_process)
    monkeypatch.setattr(ps, "GRID", [0.5, 1.0])
    monkeypatch.setattr(ps, "Z_NEEDED", -math.inf)
    monkeypatch.setattr(ps, "COHERENCE_MAX_DROP", math.inf)
    args = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "sweep"), "--docs", str(tmp_path),
            "--pairs", str(ROOT / "data/eval/contrastive_pairs.jsonl"), "--neutral",
            str(ROOT / "data/eval/neutral.jsonl"), "--fit-pairs", "1", "--eval-pairs", "3"]
    ps.main(args)
    res = json.loads((tmp_path / "sweep" / "plant_sweep.json").read_text())
    # 4 blocks: half depth 2; directions of blocks 1..n-3 = 1 are candidates; (c) may go to block 3 only
    assert res["half_depth"] == 2 and sorted(res["costs"]) == ["0", "1", "2", "3"]
    assert res["direction"] == 1 and res["strength"] == 0.5 and res["blocks"] == {"a": 2, "c": 3}
    assert list(res["strengths"]) == ["0.5", "1"] and list(res["c_blocks"]) == ["3"]
    cfg = json.loads((tmp_path / "sweep" / "plant_c_u1_L3_s0.5" / "run_config.json").read_text())["planted"]
    assert cfg["blocks"] == [3] and cfg["u_source"]["layer"] == 1 and cfg["strength"] == 0.5
    doc = (tmp_path / "plant_sweep.md").read_text()
    assert "**Chosen direction: block 1's**" in doc and "**Chosen strength: 0.5**" in doc
    assert "**Chosen block for (c): 3**" in doc
    # plants: (a) and (c) fit at 0.5, both rescaled to 1; step 4's (c) at block 3 and 0.5 is step 3's, reused.
    # evaluations: the cost scan, the base, those four plants
    assert calls.count("plant_organism.py") == 4 and calls.count("ablate_eval.py") == 6
    calls.clear()
    ps.main(args)  # every output exists: nothing is run again, and the same choice comes out
    assert calls == [] and json.loads((tmp_path / "sweep" / "plant_sweep.json").read_text())["strength"] == 0.5
