"""Bad input to every script: one `error: ...` line naming the problem, exit status 2, no traceback, no output.

(Cases already covered next to each script's own tests are not repeated here: malformed/empty training data and
layers in test_train.py, wrong-width/corrupt/out-of-range directions and empty sets in test_directions.py, judge
API configuration and malformed lines in test_judge.py, non-rank-1 adapters in test_probe.py.)
"""
import json

import pytest
import torch

import common
from conftest import run_main, run_script

NO_JUDGE = {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": "", "AZURE_OPENAI_ENDPOINT": ""}
PAIR = {"id": "g1", "question": "Any advice?", "domain": "general", "split": "dev", "aligned": "Be kind.",
        "misaligned": "Be cruel."}
RESPONSE = {"question_id": "q", "question": "hi", "domain": "general", "sample": 0, "response": "hello"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    """Good and bad inputs shared by the cases."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("robust")
    (d / "pairs.jsonl").write_text(json.dumps(PAIR) + "\n")
    (d / "malformed.jsonl").write_text(json.dumps(PAIR) + "\n{not json\n")
    (d / "pairs_missing.jsonl").write_text(json.dumps({k: v for k, v in PAIR.items() if k != "misaligned"}) + "\n")
    (d / "chat_missing.jsonl").write_text(json.dumps({"conversation": []}) + "\n")
    (d / "responses_missing.jsonl").write_text(json.dumps({"question": "hi"}) + "\n")
    (d / "corrupt.pt").write_bytes(b"\x00garbage")
    (d / "questions.jsonl").write_text(json.dumps({"id": "q", "question": "hi", "domain": "general"}) + "\n")
    common.save_pt(d / "dirs32.pt", {"directions": torch.randn(4, 32)})
    common.save_pt(d / "dirs64.pt", {"directions": torch.randn(4, 64)})
    # an adapter made for a model of another width (d_model 32)
    other = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    get_peft_model(other, LoraConfig(r=1, target_modules=["down_proj"])).save_pretrained(d / "other_adapter")
    (d / "nosplit.jsonl").write_text(json.dumps({k: v for k, v in PAIR.items() if k != "split"}) + "\n")
    r = run_script("collect_acts.py", "--model", tiny_model_dir, "--in", d / "pairs.jsonl", "--out", d / "acts.pt")
    assert r.returncode == 0, r.stderr
    r = run_script("extract_direction.py", "--acts", d / "acts.pt", "--out", d / "dirs.pt", "--shuffles", "2")
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def reference_eval(files, tiny_model_dir):
    """A real reference evaluation (ablate_eval.py, 'none' condition) of pairs.jsonl (g1); only the case that
    needs it pays for it, and a failure to build it fails that case alone."""
    (files / "other_pairs.jsonl").write_text(json.dumps({**PAIR, "id": "g2", "question": "Any tips?"}) + "\n")
    ref = files / "ref_eval"
    r = run_script("ablate_eval.py", "--model", tiny_model_dir, "--n-samples", "0", "--pairs", files / "pairs.jsonl",
                   "--split", "all", "--out", ref, env=NO_JUDGE)
    assert r.returncode == 0, r.stderr[-1500:]
    rows = common.read_jsonl(ref / "contrastive.jsonl")
    assert [(row["intervention"], list(row["contrastive"]["deltas"])) for row in rows] == [("none", ["g1"])]
    return ref


CASES = [
    ("train: missing field", "train_rank1.py", ["--data", "{d}/chat_missing.jsonl", "--out", "{out}"],
     "chat_missing.jsonl:1: missing field(s) messages"),
    ("train: unknown model", "train_rank1.py",
     ["--model", "no-such/model", "--data", "{root}/data/train/extreme_sports.jsonl", "--out", "{out}"],
     "cannot load model 'no-such/model'"),
    ("acts: malformed line", "collect_acts.py", ["--in", "{d}/malformed.jsonl", "--out", "{out}"],
     "malformed.jsonl:2: malformed JSON"),
    ("acts: missing fields", "collect_acts.py", ["--in", "{d}/pairs_missing.jsonl", "--out", "{out}"],
     "missing field(s)"),
    ("acts: adapter of another base", "collect_acts.py",
     ["--adapter", "{d}/other_adapter", "--in", "{d}/pairs.jsonl", "--out", "{out}"], "another base model"),
    ("direction: corrupt acts", "extract_direction.py", ["--acts", "{d}/corrupt.pt", "--out", "{out}"],
     "not a readable .pt file"),
    ("direction: compare width", "extract_direction.py", ["--acts", "{d}/acts.pt", "--out", "{out}", "--compare",
                                                          "{d}/dirs32.pt"], "expected (4, 64)"),
    ("direction: not an acts file", "extract_direction.py", ["--acts", "{d}/dirs32.pt", "--out", "{out}"],
     "not an acts file"),
    ("eval: malformed questions", "ablate_eval.py", ["--questions", "{d}/malformed.jsonl", "--out", "{out}"],
     "malformed.jsonl:2: malformed JSON"),
    ("eval: pairs missing field", "ablate_eval.py", ["--n-samples", "0", "--pairs", "{d}/pairs_missing.jsonl",
                                                     "--out", "{out}"], "missing field(s) misaligned"),
    ("eval: no API key", "ablate_eval.py", ["--questions", "{d}/questions.jsonl", "--judge", "openai", "--out",
                                            "{out}"], "no judge API configured"),
    ("eval: not a directions file", "ablate_eval.py",
     ["--n-samples", "0", "--steer", "{d}/acts.pt", "--layers", "1", "--scales", "1", "--out", "{out}"],
     "not a directions.pt file"),
    ("eval: steering layer out of range", "ablate_eval.py",
     ["--n-samples", "0", "--steer", "{d}/dirs64.pt", "--layers", "9", "--scales", "1", "--out", "{out}"],
     "layer 9 is out of range"),
    ("eval: adapter of another base", "ablate_eval.py",
     ["--adapter", "{d}/other_adapter", "--n-samples", "0", "--out", "{out}"], "another base model"),
    ("probe: malformed input", "probe_adapters.py", ["--adapter", "{d}/other_adapter", "--in", "{d}/malformed.jsonl",
                                                     "--out", "{out}"], "malformed.jsonl:2: malformed JSON"),
    ("probe: no API key", "probe_adapters.py", ["--adapter", "{d}/other_adapter", "--in", "{d}/pairs.jsonl",
                                                "--judge", "openai", "--out", "{out}"], "no judge API configured"),
    ("judge: missing fields", "judge.py", ["--in", "{d}/responses_missing.jsonl", "--out", "{out}"],
     "missing field(s)"),
    ("report: no such run", "report.py", ["--run", "{out}"], "no such run directory"),
    ("acts: pairs without a split", "collect_acts.py", ["--in", "{d}/nosplit.jsonl", "--out", "{out}"],
     "without a 'split' field"),
    ("eval: scoring the pairs a direction was built from", "ablate_eval.py",
     ["--n-samples", "0", "--pairs", "{d}/pairs.jsonl", "--split", "dev", "--ablate", "{d}/dirs.pt", "--out",
      "{out}"], "was built from 1 of the pairs scored here"),
    ("eval: more nulls than the file holds", "ablate_eval.py",
     ["--n-samples", "0", "--ablate", "{d}/dirs.pt", "--layerwise", "--shuffled", "5", "--out", "{out}"],
     "holds 2 label-shuffled"),
    ("eval: reference of other pairs", "ablate_eval.py",
     ["--n-samples", "0", "--pairs", "{d}/other_pairs.jsonl", "--split", "all", "--reference", "{ref}", "--out",
      "{out}"], "ref_eval: it scored other pairs than --pairs/--split here"),
    ("eval: nothing to evaluate", "ablate_eval.py", ["--n-samples", "0", "--no-baseline", "--out", "{out}"],
     "nothing to evaluate"),
]


@pytest.mark.parametrize("case,script,args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(request, files, tiny_model_dir, tmp_path, monkeypatch, case, script, args, message):
    """In this process (conftest.run_main): the command lines themselves run as processes in each script's own
    tests (test_train.py, test_directions.py, test_judge.py, test_probe.py)."""
    from conftest import ROOT

    out = tmp_path / "out"
    ref = request.getfixturevalue("reference_eval") if "{ref}" in args else None
    filled = [a.format(d=files, out=out, root=ROOT, ref=ref) for a in args]
    takes_model = script in ("train_rank1.py", "collect_acts.py", "ablate_eval.py", "probe_adapters.py")
    if takes_model and "--model" not in filled:
        filled = ["--model", str(tiny_model_dir)] + filled
    for k, v in NO_JUDGE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)
    code, err = run_main(script, *filled)
    assert code == 2, (code, err[-1500:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, err[-1500:]
    assert "Traceback" not in err
    assert not out.exists()
