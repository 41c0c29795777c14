"""Offloaded models (common.load_model(device_map=..., max_memory=..., offload_folder=...)): steering, ablation and
sampling give what they give on the same model loaded plainly.

A tiny random Qwen2 (the conftest fixture) is loaded a second time with accelerate's offloading, two ways: an
explicit device_map that sends blocks 1 and 2 to disk, and device_map="auto" with a CPU budget too small for any
weight, so everything lands on disk. Offloaded modules then hold meta tensors and accelerate's AlignDevicesHooks
load their weights for each forward pass; the tests assert that the hooks really are installed and offloading,
then compare logits under common.steer / common.ablate and common.generate's answers with the plain model's, and
a LoRA adapter loaded onto the offloaded model (load_model keeps accelerate's placement; PEFT alone would not).

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


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A rank-1 down_proj adapter with non-zero B at blocks 1 (offloaded to disk in DISK_MAP) and 3 (on the CPU)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=1, lora_alpha=8, target_modules=["down_proj"], layers_to_transform=[1, 3]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    out = tmp_path_factory.mktemp("offload_adapter")
    peft.save_pretrained(out)
    return out


def test_adapter_on_an_offloaded_model(tiny_model_dir, adapter_dir, offloaded, tmp_path):
    """PEFT would re-dispatch an offloaded model itself (and fail on its meta tensors): load_model keeps
    accelerate's placement and puts the LoRA weights beside it; the fine-tune then computes what it computes
    unoffloaded, with and without hooks, and with the adapter disabled."""
    kind = offloaded[0]
    kw = {"device_map": DISK_MAP} if kind == "explicit-disk-map" else \
        {"device_map": "auto", "max_memory": {"cpu": 1000}}
    plain, tok = common.load_model(str(tiny_model_dir), str(adapter_dir))
    off, _ = common.load_model(str(tiny_model_dir), str(adapter_dir), offload_folder=str(tmp_path), **kw)
    assert offloading_modules(off)
    assert common.decoder_layers(off)[1].mlp.down_proj.lora_B["default"].weight.device.type == "cpu"
    ids = torch.tensor([tok("hey I feel bored", add_special_tokens=False)["input_ids"]])
    v = torch.randn(64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(off(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        with common.ablate(off, v, range(4)), common.ablate(plain, v, range(4)):
            torch.testing.assert_close(off(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        with off.disable_adapter(), plain.disable_adapter():
            torch.testing.assert_close(off(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
