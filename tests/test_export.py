"""extract_direction --export-gguf / --export-safetensors and common.read_directions on the exports: round trips,
llama.cpp's layer convention, degenerate layers left out, steering with a re-imported file, corrupt files."""
import json

import gguf
import pytest
import torch
from safetensors.torch import load_file

import common
import extract_direction

N_LAYERS, D = 4, 64  # the tiny Qwen2 of conftest


def write_directions(path, directions, resid_norm=None, meta=None):
    meta = {"model": "tiny-qwen2", "kind": "mean_diff", "split": "dev"} if meta is None else meta
    torch.save({"directions": directions, "counts": {}, "meta": meta, "resid_norm": resid_norm}, path)
    return path


@pytest.fixture
def dirs_pt(tmp_path):
    """Random directions with layer 2 exactly zero (degenerate)."""
    torch.manual_seed(1)
    d = torch.randn(N_LAYERS, D)
    d[2] = 0
    return write_directions(tmp_path / "directions.pt", d), d


def export(pt, *flags):
    extract_direction.main(["--directions", str(pt), *map(str, flags)])


def gguf_fields(reader):
    return {k: f.contents() for k, f in reader.fields.items()}


def test_gguf_round_trip(dirs_pt, tmp_path):
    pt, d = dirs_pt
    out = tmp_path / "v.gguf"
    export(pt, "--export-gguf", out)
    reader = gguf.GGUFReader(out)
    fields = gguf_fields(reader)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "tiny-qwen2"
    assert fields["controlvector.layer_count"] == N_LAYERS
    # llama.cpp rejects direction.0 and layer 2 is degenerate: only blocks 1 and 3, at their own indices.
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"direction.1", "direction.3"}
    for i in (1, 3):
        t = tensors[f"direction.{i}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [D]
        assert torch.equal(torch.tensor(t.data.copy()), d[i])
    info = json.loads(fields["convergent_em.export"])
    assert info["layers"] == [1, 3] and info["norm"] == "raw" and info["method"] == "mean_diff"
    back = common.read_directions(out)
    assert back["directions"].shape == (N_LAYERS, D)
    assert torch.equal(back["directions"][[1, 3]], d[[1, 3]])
    assert not back["directions"][[0, 2]].any()
    assert back["meta"]["format"] == "gguf" and back["meta"]["model"] == "tiny-qwen2"
    assert back["resid_norm"] is None and back["shuffled"] is None


def test_safetensors_round_trip(dirs_pt, tmp_path):
    pt, d = dirs_pt
    out = tmp_path / "v.safetensors"
    export(pt, "--export-safetensors", out)
    tensors = load_file(out)
    assert set(tensors) == {"direction.0", "direction.1", "direction.3"}  # block 0 kept: no llama.cpp limit here
    for i in (0, 1, 3):
        assert tensors[f"direction.{i}"].dtype == torch.float32
        assert torch.equal(tensors[f"direction.{i}"], d[i])
    side = json.loads((tmp_path / "v.json").read_text())
    assert side["model"] == "tiny-qwen2" and side["method"] == "mean_diff" and side["split"] == "dev"
    assert side["norm"] == "raw" and side["layers"] == [0, 1, 3] and side["n_layers"] == N_LAYERS
    assert "output of decoder block i (0-based)" in side["layer_convention"]
    assert "answer tokens" in side["tokens"] and "misalignment" in side["sign"]
    assert side["skipped"] == {"2": "degenerate"}
    back = common.read_directions(out)
    assert torch.equal(back["directions"][[0, 1, 3]], d[[0, 1, 3]]) and not back["directions"][2].any()
    assert back["meta"]["format"] == "safetensors" and back["meta"]["layers"] == [0, 1, 3]


def test_unit_norm_export(dirs_pt, tmp_path):
    pt, d = dirs_pt
    export(pt, "--export-safetensors", tmp_path / "u.safetensors", "--export-norm", "unit")
    back = common.read_directions(tmp_path / "u.safetensors")
    for i in (0, 1, 3):
        v = back["directions"][i]
        assert torch.allclose(v.norm(), torch.tensor(1.0)) and torch.allclose(v, d[i] / d[i].norm())
    assert back["meta"]["norm"] == "unit"


def test_near_zero_layer_is_left_out(tmp_path):
    """Degenerate relative to the layer's residual norm (not only exactly zero), and never written as a vector."""
    torch.manual_seed(2)
    d = torch.randn(N_LAYERS, D)
    d[3] = 1e-8 * torch.randn(D)
    pt = write_directions(tmp_path / "d.pt", d, resid_norm=torch.full((N_LAYERS,), 10.0))
    export(pt, "--export-gguf", tmp_path / "v.gguf", "--export-safetensors", tmp_path / "v.safetensors")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "v.gguf").tensors}
    assert names == {"direction.1", "direction.2"}
    st = load_file(tmp_path / "v.safetensors")
    assert set(st) == {"direction.0", "direction.1", "direction.2"}
    assert all(v.norm() > 0 for v in st.values())


def test_nothing_to_export_is_an_input_error(tmp_path):
    pt = write_directions(tmp_path / "z.pt", torch.zeros(N_LAYERS, D))
    with pytest.raises(common.InputError, match="no layer"):
        export(pt, "--export-gguf", tmp_path / "z.gguf")
    assert not (tmp_path / "z.gguf").exists()


@pytest.mark.parametrize("flags, match", [
    (["--export-gguf", "v.bin"], "must end in .gguf"),
    (["--export-safetensors", "v.gguf"], "must end in .safetensors"),
    ([], "only exports"),
])
def test_bad_export_arguments(dirs_pt, tmp_path, flags, match):
    pt, _ = dirs_pt
    with pytest.raises(common.InputError, match=match):
        export(pt, *[tmp_path / f if f.startswith("v.") else f for f in flags])


@torch.no_grad()
def test_steering_with_reimported_file_matches_original(tiny_model, dirs_pt, tmp_path):
    model, tok = tiny_model
    pt, _ = dirs_pt
    export(pt, "--export-gguf", tmp_path / "v.gguf", "--export-safetensors", tmp_path / "v.safetensors")
    ids = tok("Tell me something about yourself.", return_tensors="pt")["input_ids"]
    orig = common.read_directions(pt)["directions"]

    def logits(vectors, layers, scale=3.0):
        with common.steer(model, vectors, layers, scale):
            return model(ids).logits

    for path, layers in ((tmp_path / "v.gguf", [1, 3]), (tmp_path / "v.safetensors", [0, 1, 3])):
        imported = common.read_directions(path)["directions"]
        want = logits(orig, layers)
        assert not torch.allclose(want, model(ids).logits)  # the steer does something
        assert torch.equal(logits(imported, layers), want)
    # llama.cpp adds every vector of the file: steering all blocks with the GGUF = the exported blocks only.
    gguf_dirs = common.read_directions(tmp_path / "v.gguf")["directions"]
    assert torch.equal(logits(gguf_dirs, range(N_LAYERS)), logits(orig, [1, 3]))


def test_export_after_extraction(tmp_path):
    """--acts with --export-*: the exported rows are the directions.pt just written."""
    torch.manual_seed(3)
    n = 6
    acts = {"means": torch.randn(n, N_LAYERS, D), "n_tokens": torch.arange(1, n + 1),
            "misaligned": torch.tensor([0, 1] * (n // 2)), "resid_norm": torch.full((n, N_LAYERS), 5.0),
            "ids": [f"p{k // 2}/{'misaligned' if k % 2 else 'aligned'}" for k in range(n)],
            "meta": {"model": "tiny-qwen2", "split": "dev", "source": "pairs.jsonl"}}
    torch.save(acts, tmp_path / "acts.pt")
    extract_direction.main(["--acts", str(tmp_path / "acts.pt"), "--out", str(tmp_path / "d.pt"), "--shuffles", "0",
                            "--export-gguf", str(tmp_path / "d.gguf")])
    d = common.read_directions(tmp_path / "d.pt")["directions"]
    back = common.read_directions(tmp_path / "d.gguf")
    assert torch.equal(back["directions"][1:], d[1:])
    assert back["meta"]["method"] == "mean_diff" and back["meta"]["split"] == "dev"
    # ablate_eval's train/test overlap check reads these from whatever directions file it is given
    assert back["meta"]["source"] == "pairs.jsonl" and back["meta"]["pair_ids"] == ["p0", "p1", "p2"]


def test_third_party_gguf_layer_count(tmp_path):
    """repeng and llama-cvector-generator write their tensor count as layer_count; indices still map as they are."""
    w = gguf.GGUFWriter(tmp_path / "r.gguf", "controlvector")
    w.add_string("controlvector.model_hint", "qwen2")
    w.add_uint32("controlvector.layer_count", 2)
    vs = {2: torch.randn(D), 3: torch.randn(D)}
    for i, v in vs.items():
        w.add_tensor(f"direction.{i}", v.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = common.read_directions(tmp_path / "r.gguf")["directions"]
    assert back.shape == (N_LAYERS, D) and torch.equal(back[2], vs[2]) and torch.equal(back[3], vs[3])


def test_corrupt_or_unknown_files_are_input_errors(dirs_pt, tmp_path):
    pt, _ = dirs_pt
    export(pt, "--export-gguf", tmp_path / "v.gguf")
    good = (tmp_path / "v.gguf").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) // 2])
    (tmp_path / "noise.gguf").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "noise.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (tmp_path / "d.npy").write_bytes(b"whatever")
    model_like = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    model_like.add_tensor("token_embd.weight", torch.randn(3, D).numpy())
    model_like.write_header_to_file()
    model_like.write_kv_data_to_file()
    model_like.write_tensors_to_file()
    model_like.close()
    for name in ("trunc.gguf", "noise.gguf", "noise.safetensors", "d.npy", "missing.gguf", "model.gguf"):
        with pytest.raises(common.InputError) as e:
            common.read_directions(tmp_path / name)
        assert "\n" not in str(e.value)
