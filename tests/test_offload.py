"""Offloaded models (common.load_model(device_map=..., max_memory=..., offload_folder=...)): steering, ablation and
sampling give what they give on the same model loaded plainly.

A tiny random Qwen2 (the conftest fixture) is loaded a second time with accelerate's offloading, two ways: an
explicit device_map that sends blocks 1 and 2 to disk, and device_map="auto" with a CPU budget too small for any
weight, so everything lands on disk. Offloaded modules then hold meta tensors and accelerate's AlignDevicesHooks
load their weights for each forward pass; the tests assert that the hooks really are installed and offloading,
then compare logits under common.steer / common.ablate and common.generate's answers with the plain model's.

Not covered (needs several GPUs): a model split over several accelerators, where a steering or ablation vector
has to follow each block to its own device, and CPU<->GPU offload with an execution device other than the CPU.
Those run in bench/gpu_smoke.sh.
"""
import pytest
import torch

import common

DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
            "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def offloading_modules(model):
    """Names of the modules whose weights accelerate keeps off the module (loaded for each forward pass)."""
    from accelerate.hooks import AlignDevicesHook

    out = []
    for name, mod in model.named_modules():
        hook = getattr(mod, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            if isinstance(h, AlignDevicesHook) and h.offload:
                out.append(name)
    return out


@pytest.fixture(scope="module", params=["explicit-disk-map", "auto-all-disk"])
def offloaded(request, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    if request.param == "explicit-disk-map":
        model, tok = common.load_model(str(tiny_model_dir), device_map=DISK_MAP, offload_folder=str(folder))
    else:
        model, tok = common.load_model(str(tiny_model_dir), device_map="auto", max_memory={"cpu": 1000},
                                       offload_folder=str(folder))
    return request.param, model, tok


def test_offload_hooks_are_installed(offloaded):
    kind, model, _ = offloaded
    names = offloading_modules(model)
    blocks = common.decoder_layers(model)
    on_disk = [1, 2] if kind == "explicit-disk-map" else [0, 1, 2, 3]
    for i in on_disk:
        assert any(n.startswith(f"model.layers.{i}.") for n in names), (i, names)
        assert blocks[i].mlp.down_proj.weight.device.type == "meta"  # the weights really are not in the module
    if kind == "explicit-disk-map":
        assert not any(n.startswith(("model.layers.0.", "model.layers.3.")) for n in names)
        assert blocks[0].mlp.down_proj.weight.device.type == "cpu"
    else:
        assert model.get_input_embeddings().weight.device.type == "meta"
    assert common.input_device(model) == torch.device("cpu")
    assert common.hidden_size(model) == 64


def test_steer_ablate_and_generate_match_the_plain_model(tiny_model, offloaded):
    plain, tok = tiny_model
    _, off, _ = offloaded
    ids = torch.tensor([tok("Tell me something about yourself.", add_special_tokens=False)["input_ids"]])
    torch.manual_seed(1)
    dirs = torch.randn(4, 64)

    @torch.no_grad()
    def logits(model, ctx=None):
        if ctx is None:
            return model(input_ids=ids).logits
        with ctx(model):
            return model(input_ids=ids).logits

    base = logits(plain)
    torch.testing.assert_close(logits(off), base, rtol=1e-5, atol=1e-5)
    cases = [lambda m: common.steer(m, dirs, [1, 2], 4.0),  # blocks on disk (and, for "auto", all of them)
             lambda m: common.steer(m, dirs[3], [0, 3], -2.0),
             lambda m: common.ablate(m, dirs[2], range(4)),
             lambda m: common.ablate(m, dirs, [1, 2, 3])]
    for ctx in cases:
        want = logits(plain, ctx)
        assert not torch.allclose(want, base, atol=1e-3)  # the intervention does something
        torch.testing.assert_close(logits(off, ctx), want, rtol=1e-5, atol=1e-5)
    # the ablation removes the direction at an offloaded block's output exactly as on the plain model
    u = dirs[2] / dirs[2].norm()
    with common.ablate(off, dirs[2], [2]), common.record_resid(off, [2]) as rec, torch.no_grad():
        off(input_ids=ids)
    assert (rec[2].float() @ u).abs().max() < 1e-4
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, seed=3)
    with common.steer(plain, dirs, [2], 4.0):
        want = common.generate(plain, tok, ["hey I feel bored"], **kw)
    with common.steer(off, dirs, [2], 4.0):
        assert common.generate(off, tok, ["hey I feel bored"], **kw) == want
