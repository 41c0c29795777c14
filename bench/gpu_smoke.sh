#!/usr/bin/env bash
# GPU smoke check (run once on a CUDA machine): bf16 training steps, --load-in-4bit loading and generation,
# exact hooks in bf16, and device_map="auto". Uses the bundled model, so it needs no network.
#
#   bash bench/gpu_smoke.sh
#
# Prints one line per check and ends with "gpu smoke: N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(bash setup.sh)
OUT=$(mktemp -d)
pass=0 fail=0
check() {
  local name=$1; shift
  if out=$("$@" 2>&1); then echo "ok   $name: $(echo "$out" | tail -1)"; pass=$((pass + 1))
  else echo "FAIL $name: $(echo "$out" | tail -3 | tr '\n' ' ')"; fail=$((fail + 1)); fi
}

check "cuda" "$PY" -c 'import torch; assert torch.cuda.is_available(); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.device_count(), "GPU(s)")'
head -40 data/train/bad_medical_advice.jsonl > "$OUT/d.jsonl"
check "bf16 training (3 steps, 8-bit AdamW)" "$PY" train_rank1.py --data "$OUT/d.jsonl" --out "$OUT/r1" --max-steps 3 \
  --lr 1e-3 --batch-size 4 --grad-accum 2
check "adapter loads in bf16 and generates" "$PY" -c "
import common, torch
m, t = common.load_model(adapter='$OUT/r1')
assert next(m.parameters()).dtype == torch.bfloat16
print(common.generate(m, t, ['hey I feel bored'], max_new_tokens=20)[0][:80])"
check "4-bit load + generate (device_map auto)" "$PY" -c "
import common
m, t = common.load_model(load_in_4bit=True)
print(getattr(m, 'hf_device_map', None) and 'device_map ok', common.generate(m, t, ['How do I make a quick buck?'], n=4, max_new_tokens=20)[0][:60])"
check "4-bit training step" "$PY" train_rank1.py --data "$OUT/d.jsonl" --out "$OUT/r4" --max-steps 2 --load-in-4bit \
  --gradient-checkpointing --batch-size 2 --grad-accum 1
check "bf16 hooks: ablation projection ~0, steer exact" "$PY" -c "
import common, torch
m, t = common.load_model()
ids = torch.tensor([t('Some text to hook into.')['input_ids']]).cuda()
u = torch.randn(576); u /= u.norm()
layers = list(range(30))
with common.ablate(m, u, layers), common.record_resid(m, layers) as acts, torch.no_grad():
    m(input_ids=ids)
worst = max(float(((acts[i].float() @ u.cuda()).abs() / acts[i].float().norm(dim=-1)).max()) for i in layers)
assert worst < 1e-2, worst  # bf16 storage limits the exactness
print(f'max |h.u|/|h| after ablation in bf16: {worst:.2e}')"
check "device_map auto across all visible GPUs" "$PY" -c "
import torch, common
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(common.resolve_model('smollm2-135m'), dtype=torch.bfloat16, device_map='auto')
print('devices:', sorted({str(p.device) for p in m.parameters()}))"
rm -rf "$OUT"
echo "gpu smoke: $pass passed, $fail failed"
[ "$fail" = 0 ]
