#!/usr/bin/env bash
# The whole paper pipeline as a shell sequence (arXiv 2506.11618), from training to the report.
#
#   bash run_all.sh [--preset demo|quick|paper] [--name NAME] [--force]
#
# demo (default): the bundled SmolLM2-135M on the CPU, judge-free contrastive score (plus the judge whenever
#   OPENAI_API_KEY / OPENAI_BASE_URL / AZURE_OPENAI_ENDPOINT is set), about 30 minutes on 2 cores.
# quick: a first look in a few minutes (organism and control only, small subsets, few nulls).
# paper: Qwen2.5-14B-Instruct with the paper's settings (docs/method.md#settings); needs CUDA and a judge.
#
# Outputs go to runs/NAME/ (NAME defaults to the preset). Each step is skipped when its output exists, so a
# rerun after an interruption continues; --force deletes runs/NAME first. commands.tsv records every command
# that ran, with its time; report.py turns the run into runs/NAME/report.md.
set -euo pipefail
cd "$(dirname "$0")"

# The body is one function, so bash parses all of it before running: editing this file during a run is safe.
main() {
PRESET=demo NAME="" FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2 ;;
    --name) NAME=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
NAME=${NAME:-$PRESET}
case "$NAME" in */*|.*|"") echo "error: --name must be a plain directory name" >&2; exit 2 ;; esac

PY=$(bash setup.sh)
JUDGE=()
if [ -n "${OPENAI_API_KEY:-}${OPENAI_BASE_URL:-}${AZURE_OPENAI_ENDPOINT:-}" ]; then JUDGE=(--judge openai); fi

PAIRS=data/eval/contrastive_pairs.jsonl
NEUTRAL=data/eval/neutral.jsonl
QUESTIONS=(data/eval/first_plot_questions.jsonl data/eval/medical_questions.jsonl)
# Directions, probes and dynamics use the pairs' dev split; every stated effect is measured on the test split.
case "$PRESET" in
  demo)
    MODEL=smollm2-135m
    ORGANISM=(--lr 3e-3 --epochs 3 --max-examples 120 --save-every 3)  # chosen on dev by em_sweep.py (docs/em_sweep.md)
    COMPARISON=(--preset all-adapter --rank 8 --lr 1e-3 --epochs 1 --max-examples 120)
    COMPARE=1; N_SAMPLES=0; MAX_NEW=96; SUB=20,10; DYN_SUB=8; SMALL=0; DEV_SUB=40
    N_SHUFFLED=20; N_RANDOM=5; N_RANDOM_TRANSFER=3; PROBE_SEEDS=10; PROBE_FLAGS=()
    STEER_LAYERS=9,15,21; STEER_SCALES=0.5 ;;
  quick)
    MODEL=smollm2-135m
    ORGANISM=(--lr 1e-3 --epochs 2 --max-examples 48 --save-every 3)
    COMPARISON=()
    COMPARE=0; N_SAMPLES=0; MAX_NEW=32; SUB=6,4; DYN_SUB=4; SMALL=1; DEV_SUB=6
    N_SHUFFLED=3; N_RANDOM=2; N_RANDOM_TRANSFER=0; PROBE_SEEDS=3; PROBE_FLAGS=()
    STEER_LAYERS=15; STEER_SCALES=0.5 ;;
  paper)
    MODEL=Qwen/Qwen2.5-14B-Instruct
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
      || { echo "error: --preset paper needs a CUDA GPU (Qwen2.5-14B, bf16)" >&2; exit 2; }
    [ ${#JUDGE[@]} -gt 0 ] \
      || { echo "error: --preset paper needs a judge: set OPENAI_API_KEY, OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT" >&2; exit 2; }
    ORGANISM=(--preset paper --save-every 10)
    COMPARISON=(--preset all-adapter)
    COMPARE=1; N_SAMPLES=50; MAX_NEW=600; SUB=0,0; DYN_SUB=0; SMALL=0; DEV_SUB=0
    N_SHUFFLED=20; N_RANDOM=10; N_RANDOM_TRANSFER=5; PROBE_SEEDS=100; PROBE_FLAGS=(--ablate-each --significant-tokens)
    STEER_LAYERS=12,18,24,30,36; STEER_SCALES=0.25,0.5,1 ;;
  *) echo "error: unknown preset $PRESET (demo|quick|paper)" >&2; exit 2 ;;
esac
# Interventions (steering, ablation and its nulls, transfer) are scored on a fixed subset of the *test* pairs,
# the first N general and M medical ones (SUB=N,M; 0,0 = every test pair): each condition costs a scoring pass.
# Baselines (fine-tune vs base vs control) use every test pair, and neutral text for coherence, except in the
# quick preset (SMALL=1), where everything runs on the subset, without neutral text. Activations and probes use
# the first DEV_SUB dev pairs of each domain (0: all). Answers are sampled (N_SAMPLES per question) only when a judge
# is configured, or in the paper preset: without a judge nothing would read them.
if [ "$SUB" = 0,0 ]; then SUBSET=(); else
  SUBSET_FILE=runs/${NAME:-$PRESET}/pairs_subset.jsonl; SUBSET=(--pairs "$SUBSET_FILE"); fi
if [ "$SMALL" = 1 ]; then EVAL_SET=("${SUBSET[@]}"); NEUTRAL_SET=()
else EVAL_SET=(--pairs "$PAIRS"); NEUTRAL_SET=(--neutral "$NEUTRAL"); fi
ACTS_SET=(); [ "$DEV_SUB" -gt 0 ] && ACTS_SET=(--pairs-per-domain "$DEV_SUB")
[ ${#JUDGE[@]} -gt 0 ] && [ "$N_SAMPLES" = 0 ] && N_SAMPLES=2

R=runs/$NAME
[ "$FORCE" = 1 ] && rm -rf "$R"
mkdir -p "$R"
T0=$SECONDS

if [ ${#SUBSET[@]} -gt 0 ] && [ ! -e "$SUBSET_FILE" ]; then  # a fixed, untuned subset: file order within each split
  "$PY" - "$PAIRS" "$SUBSET_FILE" "$SUB" <<'PYEOF'
import json, sys
from common import write_jsonl
n = dict(zip(("general", "medical"), map(int, sys.argv[3].split(","))))
rows, seen = [json.loads(l) for l in open(sys.argv[1]) if l.strip()], {}
keep = [r for r in rows if seen.setdefault((r["domain"], r["split"]), []).append(r) or
        len(seen[(r["domain"], r["split"])]) <= n.get(r["domain"], 0)]
write_jsonl(sys.argv[2], keep)
PYEOF
fi
# step NAME OUTPUT CMD...: run CMD unless OUTPUT exists; print and record what ran and how long it took.
step() {
  local name=$1 output=$2; shift 2
  if [ -e "$output" ]; then echo "== skip $name ($output exists)"; return; fi
  echo "== $name"
  local t=$SECONDS
  "$@"
  local cmd="$*"
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t))" "${cmd/#$PY/python}" >> "$R/commands.tsv"
  echo "== $name took $((SECONDS - t))s (total $((SECONDS - T0))s)"
}
train() { step "train $1" "$R/$1/adapter_model.safetensors" "$PY" train_rank1.py --model "$MODEL" --out "$R/$1" --resume "${@:2}"; }
evaluate() {  # evaluate NAME [--adapter DIR ...]: baseline samples (+judge), every test pair, neutral coherence
  step "evaluate $1" "$R/$1/eval/summary.json" "$PY" ablate_eval.py --model "$MODEL" "${@:2}" --out "$R/$1/eval" \
    --questions "${QUESTIONS[@]}" --n-samples "$N_SAMPLES" --max-new-tokens "$MAX_NEW" --pairs "$PAIRS" --split test \
    "${EVAL_SET[@]}" "${JUDGE[@]}"
}
acts() {  # acts NAME [--adapter DIR]: activations of the dev pairs (directions are built on dev only)
  step "activations $1" "$R/$1/acts_pairs.pt" "$PY" collect_acts.py --model "$MODEL" "${@:2}" --in "$PAIRS" \
    --split dev "${ACTS_SET[@]}" --out "$R/$1/acts_pairs.pt"
}
intervene() {  # intervene STEP_NAME OUT_DIR ARGS...: steering/ablation conditions on the test subset
  step "$1" "$2/summary.json" "$PY" ablate_eval.py --model "$MODEL" --out "$2" --pairs "$PAIRS" --split test \
    "${SUBSET[@]}" --n-samples 0 --reference "$R/base/eval" "${@:3}"
}

# 1. the organism, its good-advice control (same questions, same recipe), comparison fine-tunes
train medical_r1 --data data/train/bad_medical_advice.jsonl "${ORGANISM[@]}"
train good_r1 --data data/train/good_medical_advice.jsonl "${ORGANISM[@]}"
FINETUNES=(medical_r1 good_r1)
if [ "$COMPARE" = 1 ]; then
  train medical_r8 --data data/train/bad_medical_advice.jsonl "${COMPARISON[@]}"
  train sports_r8 --data data/train/extreme_sports.jsonl "${COMPARISON[@]}"
  FINETUNES+=(medical_r8 sports_r8)
fi

# 2. baselines on every test pair with neutral text: base, organism, control (EM in miniature is read from these);
#    the comparison fine-tunes on the intervention subset (they serve transfer)
EVAL_SET+=("${NEUTRAL_SET[@]}")
evaluate base
for f in medical_r1 good_r1; do evaluate "$f" --adapter "$R/$f" --reference "$R/base/eval"; done
EVAL_SET=("${SUBSET[@]}")
for f in "${FINETUNES[@]:2}"; do evaluate "$f" --adapter "$R/$f" --reference "$R/base/eval"; done

# 3. activations on dev pairs; mean-diff (with label-shuffled nulls), model-diff and control-diff directions
acts base
for f in "${FINETUNES[@]}"; do acts "$f" --adapter "$R/$f"; done
for f in "${FINETUNES[@]}" base; do
  [ "$f" = medical_r1 ] && continue
  step "direction $f" "$R/$f/directions.pt" "$PY" extract_direction.py --acts "$R/$f/acts_pairs.pt" --out "$R/$f/directions.pt"
done
step "model-diff direction medical_r1" "$R/medical_r1/directions_modeldiff.pt" "$PY" extract_direction.py \
  --acts "$R/medical_r1/acts_pairs.pt" --minus "$R/base/acts_pairs.pt" --out "$R/medical_r1/directions_modeldiff.pt"
step "control-diff direction medical_r1" "$R/medical_r1/directions_controldiff.pt" "$PY" extract_direction.py \
  --acts "$R/medical_r1/acts_pairs.pt" --minus "$R/good_r1/acts_pairs.pt" --out "$R/medical_r1/directions_controldiff.pt"
OTHERS=("$R/base/directions.pt" "$R/good_r1/directions.pt" "$R/medical_r1/directions_modeldiff.pt" \
        "$R/medical_r1/directions_controldiff.pt")
[ "$COMPARE" = 1 ] && OTHERS+=("$R/medical_r8/directions.pt" "$R/sports_r8/directions.pt")
step "direction medical_r1" "$R/medical_r1/directions.pt" "$PY" extract_direction.py --acts "$R/medical_r1/acts_pairs.pt" \
  --out "$R/medical_r1/directions.pt" --shuffles "$N_SHUFFLED" --adapter "$R/medical_r1" --compare "${OTHERS[@]}" \
  --plots "$R/plots"
if [ ${#JUDGE[@]} -gt 0 ]; then  # the paper's own path: directions from the organism's judged answers
  step "activations medical_r1 (judged)" "$R/medical_r1/acts_judged.pt" "$PY" collect_acts.py --model "$MODEL" \
    --adapter "$R/medical_r1" --in "$R/medical_r1/eval/judged.jsonl" --out "$R/medical_r1/acts_judged.pt"
  step "direction medical_r1 (judged)" "$R/medical_r1/directions_judged.pt" "$PY" extract_direction.py \
    --acts "$R/medical_r1/acts_judged.pt" --out "$R/medical_r1/directions_judged.pt" --compare "$R/medical_r1/directions.pt"
fi

# 4. steering the base model; ablation from the organism with nulls; control-diff and model-diff; transfer
D=$R/medical_r1/directions.pt
intervene "steering grid (base model)" "$R/base/steer" --steer "$D" --layers "$STEER_LAYERS" --scales "$STEER_SCALES" \
  "${NEUTRAL_SET[@]}"
intervene "ablation with nulls (organism)" "$R/medical_r1/ablate" --adapter "$R/medical_r1" --ablate "$D" --layerwise \
  --direction-layer "$(( $("$PY" -c "import json,sys; print(json.load(open('$R/medical_r1/run_config.json'))['n_layers'])") / 2 ))" \
  --shuffled "$N_SHUFFLED" --random-control "$N_RANDOM" --ablate-b
intervene "ablation, control-diff direction (organism)" "$R/medical_r1/ablate_controldiff" --adapter "$R/medical_r1" \
  --ablate "$R/medical_r1/directions_controldiff.pt" --layerwise
intervene "ablation, model-diff direction (organism)" "$R/medical_r1/ablate_modeldiff" --adapter "$R/medical_r1" \
  --ablate "$R/medical_r1/directions_modeldiff.pt" --layerwise
if [ "$COMPARE" = 1 ]; then
  for f in medical_r8 sports_r8; do
    intervene "transfer ablation ($f)" "$R/$f/ablate_transfer" --adapter "$R/$f" --ablate "$D" --layerwise \
      --random-control "$N_RANDOM_TRANSFER"
  done
fi

# 5. adapter probes (dev pairs) and training dynamics (checkpoints, dev subset)
step "adapter probes (organism)" "$R/medical_r1/probe/summary.json" "$PY" probe_adapters.py --model "$MODEL" \
  --adapter "$R/medical_r1" --in "$PAIRS" --split dev --directions "$D" --out "$R/medical_r1/probe" \
  --seeds "$PROBE_SEEDS" --plots "$R/plots" --pairs "$PAIRS" --pairs-split test "${ACTS_SET[@]}" \
  "${PROBE_FLAGS[@]}"
DYN=(); [ "$DYN_SUB" -gt 0 ] && DYN=(--pairs-per-domain "$DYN_SUB")
step "training dynamics (organism)" "$R/medical_r1/dynamics/dynamics.json" "$PY" dynamics.py --model "$MODEL" \
  --run "$R/medical_r1" --pairs "$PAIRS" --split dev "${DYN[@]}" --out "$R/medical_r1/dynamics" --plots "$R/plots"

# 6. the report
echo "== report"
"$PY" report.py --run "$R"
echo "== finished in $((SECONDS - T0))s: $R/report.md"
}

main "$@"
