"""Shared fixtures: the bundled SmolLM2 (converted once) and a tiny random Qwen2 that uses its tokenizer."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub; unknown ids must fail fast

import common  # noqa: E402


@pytest.fixture(scope="session")
def bundled_dir():
    return common.bundled_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_dir):
    """A randomly initialised 4-layer Qwen2 (d_model 64) with the bundled tokenizer, saved like any HF model."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return common.load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def bundled_model(bundled_dir):
    return common.load_model(common.DEFAULT_MODEL)


def run_script(*args, timeout=600, env=None):
    """Run one of the repo's scripts in a fresh process; returns CompletedProcess (text)."""
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def run_main(script, *args):
    """A script's main() behind common.cli, exactly as its `__main__` runs it, but in this process (a fresh process
    costs seconds of imports on 2 cores): returns (exit status, stderr). Any exception other than the one-line
    errors cli() turns into exit 2 propagates, so a traceback fails the test."""
    import contextlib
    import importlib
    import io

    module = importlib.import_module(Path(script).stem)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            common.cli(lambda: module.main([str(a) for a in args]))
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()
