#!/usr/bin/env bash
# The whole paper pipeline as a shell sequence (arXiv 2506.11618), from training to the report.
#
#   bash run_all.sh [--preset demo|quick|paper] [--name NAME] [--force]
#
# demo (default): the bundled SmolLM2-135M on the CPU, judge-free contrastive score (plus the judge whenever
#   OPENAI_API_KEY / OPENAI_BASE_URL / AZURE_OPENAI_ENDPOINT is set), about 25 minutes on 2 cores.
# quick: a first look in a few minutes (organism only, subsets).
# paper: Qwen2.5-14B-Instruct with DESIGN §1 settings; needs CUDA and a judge.
#
# Outputs go to runs/NAME/ (NAME defaults to the preset). Each step is skipped when its output exists, so a
# rerun after an interruption continues; --force deletes runs/NAME first. commands.tsv records every command
# that ran, with its time; report.py turns the run into runs/NAME/report.md.
set -euo pipefail
cd "$(dirname "$0")"

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
QUESTIONS=(data/eval/first_plot_questions.jsonl data/eval/medical_questions.jsonl)
case "$PRESET" in
  demo)
    MODEL=smollm2-135m
    ORGANISM=(--lr 1e-3 --epochs 3 --max-examples 120)          # CPU demo settings, not the paper's
    COMPARISON=(--preset all-adapter --rank 8 --lr 1e-3 --epochs 1 --max-examples 120)
    COMPARE=1; N_SAMPLES=1; MAX_NEW=96; EVAL_PAIRS=20; SWEEP_PAIRS=10; PROBE_SEEDS=20; N_RANDOM=5; N_RANDOM_TRANSFER=3
    PROBE_FLAGS=(--ablate-each)
    STEER_LAYERS=9,15,21; STEER_SCALES=4,8; SWEEP=3,9,15,21,27 ;;
  quick)
    MODEL=smollm2-135m
    ORGANISM=(--lr 1e-3 --epochs 2 --max-examples 48)
    COMPARISON=()
    COMPARE=0; N_SAMPLES=1; MAX_NEW=48; EVAL_PAIRS=6; SWEEP_PAIRS=4; PROBE_SEEDS=5; N_RANDOM=2; N_RANDOM_TRANSFER=0
    PROBE_FLAGS=()
    STEER_LAYERS=15; STEER_SCALES=4; SWEEP=15 ;;
  paper)
    MODEL=Qwen/Qwen2.5-14B-Instruct
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
      || { echo "error: --preset paper needs a CUDA GPU (Qwen2.5-14B, bf16)" >&2; exit 2; }
    [ ${#JUDGE[@]} -gt 0 ] \
      || { echo "error: --preset paper needs a judge: set OPENAI_API_KEY, OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT" >&2; exit 2; }
    ORGANISM=(--preset paper)
    COMPARISON=(--preset all-adapter)
    COMPARE=1; N_SAMPLES=50; MAX_NEW=600; EVAL_PAIRS=0; SWEEP_PAIRS=0; PROBE_SEEDS=100; N_RANDOM=5; N_RANDOM_TRANSFER=5
    PROBE_FLAGS=(--ablate-each --significant-tokens)
    STEER_LAYERS=12,18,24,30,36; STEER_SCALES=4,8,12,16; SWEEP=all ;;
  *) echo "error: unknown preset $PRESET (demo|quick|paper)" >&2; exit 2 ;;
esac
# Pair subsets (first N pairs of each domain, 0 = all): EVAL for baselines and activations, SUBSET for the many
# conditions of the sweeps, where each condition costs one scoring pass.
EVAL=(); [ "$EVAL_PAIRS" -gt 0 ] && EVAL=(--pairs-per-domain "$EVAL_PAIRS")
SUBSET=(); [ "$SWEEP_PAIRS" -gt 0 ] && SUBSET=(--pairs-per-domain "$SWEEP_PAIRS")

R=runs/$NAME
[ "$FORCE" = 1 ] && rm -rf "$R"
mkdir -p "$R"
T0=$SECONDS

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
evaluate() {  # evaluate NAME [--adapter DIR]: baseline samples (+judge) and the contrastive score on all pairs
  step "evaluate $1" "$R/$1/eval/summary.json" "$PY" ablate_eval.py --model "$MODEL" "${@:2}" --out "$R/$1/eval" \
    --questions "${QUESTIONS[@]}" --n-samples "$N_SAMPLES" --max-new-tokens "$MAX_NEW" --pairs "$PAIRS" "${EVAL[@]}" "${JUDGE[@]}"
}
acts() {  # acts NAME [--adapter DIR]: pair activations and their mean-difference direction
  step "activations $1" "$R/$1/acts_pairs.pt" "$PY" collect_acts.py --model "$MODEL" "${@:2}" --in "$PAIRS" \
    "${EVAL[@]}" --out "$R/$1/acts_pairs.pt"
}

# 1. model organism and comparison fine-tunes
train medical_r1 --data data/train/bad_medical_advice.jsonl "${ORGANISM[@]}"
FINETUNES=(medical_r1)
if [ "$COMPARE" = 1 ]; then
  train sports_r8 --data data/train/extreme_sports.jsonl "${COMPARISON[@]}"
  train financial_r8 --data data/train/risky_financial_advice.jsonl "${COMPARISON[@]}"
  FINETUNES+=(sports_r8 financial_r8)
fi

# 2. baseline evaluation of the base model and every fine-tune
evaluate base
for f in "${FINETUNES[@]}"; do evaluate "$f" --adapter "$R/$f"; done

# 3. activations, directions, convergence
acts base
for f in "${FINETUNES[@]}"; do acts "$f" --adapter "$R/$f"; done
for f in "${FINETUNES[@]}" base; do
  [ "$f" = medical_r1 ] && continue
  step "direction $f" "$R/$f/directions.pt" "$PY" extract_direction.py --acts "$R/$f/acts_pairs.pt" --out "$R/$f/directions.pt"
done
step "model-diff direction medical_r1" "$R/medical_r1/directions_modeldiff.pt" "$PY" extract_direction.py \
  --acts "$R/medical_r1/acts_pairs.pt" --minus "$R/base/acts_pairs.pt" --out "$R/medical_r1/directions_modeldiff.pt"
OTHERS=("$R/base/directions.pt" "$R/medical_r1/directions_modeldiff.pt")
[ "$COMPARE" = 1 ] && OTHERS+=("$R/sports_r8/directions.pt" "$R/financial_r8/directions.pt")
step "direction medical_r1" "$R/medical_r1/directions.pt" "$PY" extract_direction.py --acts "$R/medical_r1/acts_pairs.pt" \
  --out "$R/medical_r1/directions.pt" --adapter "$R/medical_r1" --compare "${OTHERS[@]}" --plots "$R/plots"
if [ ${#JUDGE[@]} -gt 0 ]; then  # the paper's own path: directions from the organism's judged answers
  step "activations medical_r1 (judged)" "$R/medical_r1/acts_judged.pt" "$PY" collect_acts.py --model "$MODEL" \
    --adapter "$R/medical_r1" --in "$R/medical_r1/eval/judged.jsonl" --out "$R/medical_r1/acts_judged.pt"
  step "direction medical_r1 (judged)" "$R/medical_r1/directions_judged.pt" "$PY" extract_direction.py \
    --acts "$R/medical_r1/acts_judged.pt" --out "$R/medical_r1/directions_judged.pt" --compare "$R/medical_r1/directions.pt"
fi

# 4. steering the base model, ablation with random controls, the direction-layer sweep, transfer
D=$R/medical_r1/directions.pt
step "steering grid (base model)" "$R/base/steer/summary.json" "$PY" ablate_eval.py --model "$MODEL" --out "$R/base/steer" \
  --steer "$D" --layers "$STEER_LAYERS" --scales "$STEER_SCALES" --pairs "$PAIRS" "${SUBSET[@]}" \
  --n-samples 0
step "ablation sweep (organism)" "$R/medical_r1/ablate/summary.json" "$PY" ablate_eval.py --model "$MODEL" \
  --adapter "$R/medical_r1" --out "$R/medical_r1/ablate" --ablate "$D" --layerwise --direction-layers "$SWEEP" \
  --random-control "$N_RANDOM" --ablate-b --pairs "$PAIRS" "${SUBSET[@]}" --n-samples 0
step "ablation sweep, model-diff direction (organism)" "$R/medical_r1/ablate_modeldiff/summary.json" "$PY" ablate_eval.py \
  --model "$MODEL" --adapter "$R/medical_r1" --out "$R/medical_r1/ablate_modeldiff" \
  --ablate "$R/medical_r1/directions_modeldiff.pt" --direction-layers "$SWEEP" --pairs "$PAIRS" "${SUBSET[@]}" --n-samples 0
if [ "$COMPARE" = 1 ]; then
  for f in sports_r8 financial_r8; do
    step "transfer ablation ($f)" "$R/$f/ablate_transfer/summary.json" "$PY" ablate_eval.py --model "$MODEL" \
      --adapter "$R/$f" --out "$R/$f/ablate_transfer" --ablate "$D" --layerwise --random-control "$N_RANDOM_TRANSFER" \
      --pairs "$PAIRS" "${SUBSET[@]}" --n-samples 0
  done
fi

# 5. adapter probes and adapter steering
step "adapter probes (organism)" "$R/medical_r1/probe/summary.json" "$PY" probe_adapters.py --model "$MODEL" \
  --adapter "$R/medical_r1" --in "$PAIRS" --out "$R/medical_r1/probe" --seeds "$PROBE_SEEDS" --plots "$R/plots" \
  "${PROBE_FLAGS[@]}" --pairs "$PAIRS" "${SUBSET[@]}"

# 6. the report
echo "== report"
"$PY" report.py --run "$R"
echo "== finished in $((SECONDS - T0))s: $R/report.md"
