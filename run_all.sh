#!/usr/bin/env bash
# The whole paper pipeline as a shell sequence (arXiv 2506.11618), from training to the report.
#
#   bash run_all.sh [--preset demo|quick|full|planted|paper] [--name NAME] [--force] [--dry-run]
#                   [--plant-layer N] [--plant-direction D] [--plant-c-layer M] [--plant-strength S]
#
# demo (default): the bundled SmolLM2-135M on the CPU, judge-free contrastive score (plus the judge whenever
#   OPENAI_API_KEY / OPENAI_BASE_URL / AZURE_OPENAI_ENDPOINT is set): 3 training seeds per arm, 20 nulls for every
#   verdict that uses nulls, difference in differences for every ablation.
# quick: a first look in a few minutes (one seed, small subsets, no nulls): its verdicts read "not testable".
# full: the demo on every test pair, with nulls for every intervention.
# planted: the positive control: planted organisms with a known direction through the unchanged pipeline, and the
#   detection limit of each experiment (docs/method.md#positive-control). u is the base model's dev-pair direction
#   of block D (--plant-direction); (a) and (b) are planted at block N (--plant-layer; default: half depth), (c) at
#   block M (--plant-c-layer; default: N+2 with --plant-layer, else the preset's), at S × the block's mean residual
#   norm (--plant-strength). The defaults of D, M and S were chosen on dev by plant_sweep.py (docs/plant_sweep.md).
# paper: Qwen2.5-14B-Instruct with the paper's settings (docs/method.md#settings); needs CUDA and a judge.
# --dry-run: print every command the run would execute, check each one's arguments with its script's own parser,
#   and print the time, memory and judge-cost plan; loads no model and runs nothing (dry_run.py).
#
# Outputs go to runs/NAME/ (NAME defaults to the preset). Each step is skipped when its output exists, so a
# rerun after an interruption continues; --force deletes runs/NAME first. commands.tsv records every command
# that ran, with its time; report.py turns the run into runs/NAME/report.md.
set -euo pipefail
cd "$(dirname "$0")"

# The body is one function, so bash parses all of it before running: editing this file during a run is safe.
main() {
PRESET=demo NAME="" FORCE=0 DRY=0 PLANT_LAYER="" PLANT_DIRECTION="" PLANT_C_LAYER="" PLANT_S=""
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2 ;;
    --name) NAME=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --plant-layer) PLANT_LAYER=${2:-}; shift 2 ;;
    --plant-direction) PLANT_DIRECTION=${2:-}; shift 2 ;;
    --plant-c-layer) PLANT_C_LAYER=${2:-}; shift 2 ;;
    --plant-strength) PLANT_S=${2:-}; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
NAME=${NAME:-$PRESET}
for flag in "--plant-layer $PLANT_LAYER" "--plant-direction $PLANT_DIRECTION" "--plant-c-layer $PLANT_C_LAYER"; do
  case "${flag#* }" in
    "") ;;
    *[!0-9]*) echo "error: ${flag%% *} must be a block index, got ${flag#* }" >&2; exit 2 ;;
    *) [ "$PRESET" = planted ] || { echo "error: ${flag%% *} is for --preset planted" >&2; exit 2; } ;;
  esac
done
if [ -n "$PLANT_S" ]; then
  [[ $PLANT_S =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ && $PLANT_S =~ [1-9] ]] \
    || { echo "error: --plant-strength must be a positive number, got $PLANT_S" >&2; exit 2; }
  [ "$PRESET" = planted ] || { echo "error: --plant-strength is for --preset planted" >&2; exit 2; }
fi
case "$NAME" in */*|.*|"") echo "error: --name must be a plain directory name" >&2; exit 2 ;; esac

PY=$(bash setup.sh)
JUDGE=()
if [ -n "${OPENAI_API_KEY:-}${OPENAI_BASE_URL:-}${AZURE_OPENAI_ENDPOINT:-}" ]; then JUDGE=(--judge openai); fi

PAIRS=data/eval/contrastive_pairs.jsonl
NEUTRAL=data/eval/neutral.jsonl
QUESTIONS=(data/eval/first_plot_questions.jsonl data/eval/medical_questions.jsonl)
# Directions, probes and dynamics use the pairs' dev split; every stated effect is measured on the test split.
# SUB=N,M: interventions (steering, ablation and their nulls, transfer) are scored on a fixed theme-spread subset of
# N general and M medical test pairs (0,0: every test pair); NEUTRAL_SUB neutral items (at most 55) measure their
# coherence.
# Baselines (every fine-tune and seed vs base) use every test pair and all neutral text. DEV_SUB: dev pairs per
# domain for activations and probes (0: all). A family of nulls that decides a verdict has 20 members (p < 0.05
# needs 20); a preset without them runs none, and its verdicts read "not testable".
SEEDS=3 COMPARE=1 N_SAMPLES=0 MAX_NEW=96 SUB=20,10 NEUTRAL_SUB=40 DEV_SUB=40 DYN_SUB=8 SMALL=0 PLANTED=0
N_SHUFFLED=20 N_RANDOM=5 TRANSFER_NULLS=20 FRONTIER_NULLS=2 PROBE_SEEDS=10 PERMUTATIONS=20 PROBE_FLAGS=()
STEER_LAYERS=9,15,21 STEER_SCALES=0.05,0.1,0.25,0.5
MODEL=smollm2-135m
ORGANISM=(--lr 3e-3 --epochs 3 --max-examples 120 --save-every 3)  # chosen on dev by em_sweep.py, then frozen
COMPARISON=(--preset all-adapter --rank 8 --lr 1e-3 --epochs 1 --max-examples 120)
case "$PRESET" in
  demo) ;;
  full) SUB=0,0; NEUTRAL_SUB=55 ;;
  quick)
    ORGANISM=(--lr 1e-3 --epochs 2 --max-examples 48 --save-every 3)
    SEEDS=1 COMPARE=0 MAX_NEW=32 SUB=6,4 NEUTRAL_SUB=10 DEV_SUB=6 DYN_SUB=4 SMALL=1
    N_SHUFFLED=0 N_RANDOM=0 TRANSFER_NULLS=0 FRONTIER_NULLS=0 PROBE_SEEDS=3 PERMUTATIONS=0
    STEER_LAYERS=15 STEER_SCALES=0.1,0.5 ;;
  planted)  # u = block 21's direction, strength 0.1, (c) at block 16: chosen on dev by plant_sweep.py, then frozen
    PLANTED=1 SEEDS=1 SUB=16,0 NEUTRAL_SUB=20 DEV_SUB=12 PLANT_U=21 PLANT_STRENGTH=0.1 PLANT_C=16 PROBE_SEEDS=5
    TRANSFER_NULLS=20 ;;
  paper)
    MODEL=Qwen/Qwen2.5-14B-Instruct
    if [ "$DRY" = 0 ]; then
      "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || { echo "error: --preset paper needs a CUDA GPU (Qwen2.5-14B, bf16)" >&2; exit 2; }
      [ ${#JUDGE[@]} -gt 0 ] \
        || { echo "error: --preset paper needs a judge: set OPENAI_API_KEY, OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT" >&2; exit 2; }
    fi
    ORGANISM=(--preset paper --save-every 10)
    COMPARISON=(--preset all-adapter)
    N_SAMPLES=50 MAX_NEW=600 SUB=0,0 NEUTRAL_SUB=55 DEV_SUB=0 DYN_SUB=0 N_RANDOM=10 PROBE_SEEDS=100
    PROBE_FLAGS=(--ablate-each --significant-tokens)
    STEER_LAYERS=12,18,24,30,36 STEER_SCALES=0.05,0.1,0.25,0.5,1 ;;
  *) echo "error: unknown preset $PRESET (demo|quick|full|planted|paper)" >&2; exit 2 ;;
esac
# the paper run is planned as it would run: with its judge, even where no key is set (the dry run reports that)
[ "$DRY" = 1 ] && [ "$PRESET" = paper ] && [ ${#JUDGE[@]} = 0 ] && JUDGE=(--judge openai)
[ ${#JUDGE[@]} -gt 0 ] && [ "$N_SAMPLES" = 0 ] && N_SAMPLES=2

R=runs/$NAME
if [ "$DRY" = 1 ]; then
  PLAN=$(mktemp); trap 'rm -f "$PLAN"' EXIT
else
  [ "$FORCE" = 1 ] && rm -rf "$R"
  mkdir -p "$R"
fi
T0=$SECONDS

# step NAME OUTPUT CMD...: run CMD unless OUTPUT exists; print and record what ran and how long it took.
# In a dry run, record the command for dry_run.py instead.
step() {
  local name=$1 output=$2; shift 2
  if [ "$DRY" = 1 ]; then printf '%s\t%s\n' "$name" "${*/#$PY/python}" >> "$PLAN"; return; fi
  if [ -e "$output" ]; then echo "== skip $name ($output exists)"; return; fi
  echo "== $name"
  local t=$SECONDS
  "$@"
  local cmd="$*"
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t))" "${cmd/#$PY/python}" >> "$R/commands.tsv"
  echo "== $name took $((SECONDS - t))s (total $((SECONDS - T0))s)"
}
# value CMD...: a value known only after an earlier step ran (a placeholder in a dry run)
value() { if [ "$DRY" = 1 ]; then echo "<$1>"; else "${@:2}"; fi; }

# fixed, untuned subsets: theme-spread test pairs for interventions, the first neutral items
SUBSET=() NEUTRAL_SET=(--neutral "$NEUTRAL") NEUTRAL_INT=(--neutral "$NEUTRAL")
if [ "$SUB" != 0,0 ]; then
  SUBSET=(--pairs "$R/pairs_subset.jsonl")
  step "test subset" "$R/pairs_subset.jsonl" "$PY" -c "import sys, common; n = dict(zip(('general', 'medical'), \
map(int, sys.argv[2].split(',')))); rows = common.read_pairs(sys.argv[1], split='test'); \
common.write_jsonl(sys.argv[3], [r for d in n for r in common.theme_subset([x for x in rows if x['domain'] == d], n[d])])" \
    "$PAIRS" "$SUB" "$R/pairs_subset.jsonl"
fi
# neutral text: interventions on test are judged on the first NEUTRAL_SUB items (at most 55), the steering choice on
# dev on the second half (items 56-110), so no choice sees the items it is judged on
NEUTRAL_INT=(--neutral "$R/neutral_subset.jsonl") NEUTRAL_DEV=(--neutral "$R/neutral_dev.jsonl")
step "neutral subsets" "$R/neutral_dev.jsonl" "$PY" -c "import sys, common; \
test, dev = common.neutral_parts(common.read_jsonl(sys.argv[1]), int(sys.argv[4])); \
common.write_jsonl(sys.argv[2], test); common.write_jsonl(sys.argv[3], dev)" \
  "$NEUTRAL" "$R/neutral_subset.jsonl" "$R/neutral_dev.jsonl" "$NEUTRAL_SUB"
EVAL_SET=(--pairs "$PAIRS" "${NEUTRAL_SET[@]}")
[ "$SMALL" = 1 ] && EVAL_SET=("${SUBSET[@]}" "${NEUTRAL_INT[@]}")
ACTS_SET=(); [ "$DEV_SUB" -gt 0 ] && ACTS_SET=(--pairs-per-domain "$DEV_SUB")

train() { step "train $1" "$R/$1/adapter_model.safetensors" "$PY" train_rank1.py --model "$MODEL" --out "$R/$1" --resume "${@:2}"; }
evaluate() {  # evaluate NAME [--adapter DIR ...]: baseline samples (+judge), every test pair, neutral coherence
  step "evaluate $1" "$R/$1/eval/summary.json" "$PY" ablate_eval.py --model "$MODEL" "${@:2}" --out "$R/$1/eval" \
    --questions "${QUESTIONS[@]}" --n-samples "$N_SAMPLES" --max-new-tokens "$MAX_NEW" --pairs "$PAIRS" --split test \
    "${EVAL_SET[@]}" "${JUDGE[@]}"
}
acts() {  # acts NAME OUT [--adapter DIR] [--split S]: activations of dev pairs (directions are built on dev only)
  step "activations $1 ($2)" "$R/$1/$2" "$PY" collect_acts.py --model "$MODEL" --in "$PAIRS" --split dev \
    "${ACTS_SET[@]}" --out "$R/$1/$2" "${@:3}"
}
intervene() {  # intervene STEP_NAME OUT_DIR ARGS...: steering/ablation conditions on the test subset
  step "$1" "$2/summary.json" "$PY" ablate_eval.py --model "$MODEL" --out "$2" --pairs "$PAIRS" --split test \
    "${SUBSET[@]}" "${NEUTRAL_INT[@]}" --n-samples 0 "${@:3}"
}
report() { [ "$DRY" = 1 ] && { step "report" "$R/report.md" "$PY" report.py --run "$R" "$@"; return; }
  echo "== report"; "$PY" report.py --run "$R" "$@"; }
NULLS=(); [ "$N_SHUFFLED" -gt 0 ] && NULLS=(--shuffled "$N_SHUFFLED" --random-control "$N_RANDOM")

if [ "$PLANTED" = 1 ]; then
  # The positive control (docs/method.md#positive-control): (a) the base model's own dev-pair direction of block U
  # planted at half depth (or --plant-layer), (b) a unit direction orthogonal to it at the same block (the control),
  # (c) the same direction at a later block (a second fine-tune, for transfer). Roles for report.py: a is the
  # organism, b its control, c the comparison fine-tune.
  acts base acts_pairs.pt
  step "direction base" "$R/base/directions.pt" "$PY" extract_direction.py --acts "$R/base/acts_pairs.pt" \
    --out "$R/base/directions.pt"
  H=${PLANT_LAYER:-$(value half-depth "$PY" -c "import common, transformers; print(common.half_depth_layer(\
transformers.AutoConfig.from_pretrained(common.resolve_model('$MODEL')).num_hidden_layers))")}
  C=${PLANT_C_LAYER:-$([ -n "$PLANT_LAYER" ] && echo $((PLANT_LAYER + 2)) || echo "$PLANT_C")}
  U=${PLANT_DIRECTION:-$PLANT_U} PLANT_STRENGTH=${PLANT_S:-$PLANT_STRENGTH}  # u is block U's direction
  PLANT=(--model "$MODEL" --pairs "$PAIRS" --split dev --pairs-per-domain "$DEV_SUB" --strength "$PLANT_STRENGTH")
  step "plant a" "$R/plant_a/adapter_model.safetensors" "$PY" plant_organism.py "${PLANT[@]}" \
    --direction "$R/base/directions.pt" --direction-layer "$U" --blocks "$H" --out "$R/plant_a"
  # (b) and (c) reuse (a)'s base-model pass: same model, same fit pairs
  step "plant b" "$R/plant_b/adapter_model.safetensors" "$PY" plant_organism.py "${PLANT[@]}" \
    --orthogonal-to "$R/base/directions.pt" --direction-layer "$U" --blocks "$H" --fit-from "$R/plant_a" \
    --out "$R/plant_b"
  step "plant c" "$R/plant_c/adapter_model.safetensors" "$PY" plant_organism.py "${PLANT[@]}" \
    --direction "$R/base/directions.pt" --direction-layer "$U" --blocks "$C" --fit-from "$R/plant_a" \
    --out "$R/plant_c"
  [ "$DRY" = 1 ] || printf '{"organism": "plant_a", "control": "plant_b", "comparisons": {"plant_c": "%s"}}\n' \
    "plant (c), same direction at block $C" > "$R/roles.json"
  acts plant_a acts_pairs.pt --adapter "$R/plant_a"
  step "model-diff direction plant_a" "$R/plant_a/directions_modeldiff.pt" "$PY" extract_direction.py \
    --acts "$R/plant_a/acts_pairs.pt" --minus "$R/base/acts_pairs.pt" --out "$R/plant_a/directions_modeldiff.pt" \
    --compare "$R/plant_a/planted_u.pt"
  # the recovered direction at the planted block, ablated at every block from both models (the paper's one
  # direction everywhere: it is u itself, where a layerwise model-diff above the plant is u carried through the
  # blocks, which (c) does not write), with 20 Gaussian nulls (a model-diff direction has no labels to shuffle);
  # the base passes are shared by the transfer runs (same conditions, same specs). Each run's no-intervention
  # condition is that model's evaluation (the test subset and the neutral text), so the run is written to eval/
  # and ablate/ names the same directory: one pass, not two
  D=$R/plant_a/directions_modeldiff.pt
  ABL=(--ablate "$D" --direction-layer "$H" --random-control "$TRANSFER_NULLS")
  intervene "ablation (base, planted direction)" "$R/base/eval" "${ABL[@]}"
  intervene "ablation (plant a)" "$R/plant_a/eval" --adapter "$R/plant_a" "${ABL[@]}" --reference "$R/base/eval"
  intervene "transfer ablation (plant_c)" "$R/plant_c/eval" --adapter "$R/plant_c" "${ABL[@]}" \
    --reference "$R/base/eval"
  [ "$DRY" = 1 ] || { ln -sfn eval "$R/base/ablate"; ln -sfn eval "$R/plant_a/ablate"
                      ln -sfn eval "$R/plant_c/ablate_transfer"; }
  # (b), the negative control, has no shift to remove (no ablation verdict whatever its nulls say): its
  # evaluation only, for its shift and the em rule's control
  EVAL_SET=("${SUBSET[@]}" "${NEUTRAL_INT[@]}")
  evaluate plant_b --adapter "$R/plant_b" --reference "$R/base/eval"
  step "adapter probes (plant a)" "$R/plant_a/probe/summary.json" "$PY" probe_adapters.py --model "$MODEL" \
    --adapter "$R/plant_a" --in "$PAIRS" --split dev --out "$R/plant_a/probe" --seeds "$PROBE_SEEDS" \
    --permutations "$TRANSFER_NULLS" "${ACTS_SET[@]}"
  # two more strengths of plant (a), whose expected shifts are 0.5x and 1.5x the limit from (a)'s own standard
  # error: a linearity check. Both are detected, since a plant's spread scales with it; report.py checks the
  # limit itself on a fixed spread (docs/method.md#positive-control)
  if [ "$DRY" = 0 ]; then
    read -r LO HI < <("$PY" - "$R" "$PLANT_STRENGTH" <<'PYEOF'
import json, sys
s = json.load(open(f"{sys.argv[1]}/plant_a/eval/summary.json"))["reference_shift"]["general"]
mde = 2.8 * (s["ci"][1] - s["ci"][0]) / 3.92
if s["ci"][0] > 0:  # the strength whose expected shift equals the limit, if the shift grows linearly
    limit = float(sys.argv[2]) * mde / s["diff"]
    print(f"{0.5 * limit:.4g} {1.5 * limit:.4g}")
else:  # no detected shift at the main strength: nothing to scale from
    print("none none")
PYEOF
)
  else LO="<half-the-predicted-limit>" HI="<1.5x-the-predicted-limit>"; fi
  EVAL_SET=("${SUBSET[@]}")  # the rescaled plants' shifts only: no neutral text
  for w in lo hi; do
    S=$([ $w = lo ] && echo "$LO" || echo "$HI")
    [ "$S" = none ] && { echo "== plant (a) shows no shift at strength $PLANT_STRENGTH: no detection-limit check"; break; }
    step "plant a ($w strength)" "$R/plant_a_$w/adapter_model.safetensors" "$PY" plant_organism.py \
      --rescale "$R/plant_a" --strength "$S" --out "$R/plant_a_$w"
    evaluate "plant_a_$w" --adapter "$R/plant_a_$w" --reference "$R/base/eval"
  done
  report
  if [ "$DRY" = 1 ]; then "$PY" dry_run.py --plan "$PLAN" --preset "$PRESET"; return; fi
  echo "== finished in $((SECONDS - T0))s: $R/report.md"
  return 0
fi

# 1. the organism and its good-advice control (same questions, same recipe) at SEEDS training seeds (seed 0 is the
#    primary organism: directions, steering, ablation, probes and dynamics use it; the other seeds feed the EM
#    verdict and convergence), and the comparison fine-tunes
ORGS=(medical_r1) CTLS=(good_r1)
for k in $(seq 1 $((SEEDS - 1))); do ORGS+=("medical_r1_seed$k"); CTLS+=("good_r1_seed$k"); done
for k in $(seq 0 $((SEEDS - 1))); do
  train "${ORGS[$k]}" --data data/train/bad_medical_advice.jsonl "${ORGANISM[@]}" --seed "$k"
  train "${CTLS[$k]}" --data data/train/good_medical_advice.jsonl "${ORGANISM[@]}" --seed "$k"
done
COMPS=()
if [ "$COMPARE" = 1 ]; then
  train medical_r8 --data data/train/bad_medical_advice.jsonl "${COMPARISON[@]}" --seed 0
  train sports_r8 --data data/train/extreme_sports.jsonl "${COMPARISON[@]}" --seed 0
  COMPS=(medical_r8 sports_r8)
fi

# 2. baselines on every test pair with neutral text: base, every organism and control seed (EM in miniature is read
#    from these); the comparison fine-tunes on the intervention subset (they serve transfer)
evaluate base
for f in "${ORGS[@]}" "${CTLS[@]}"; do evaluate "$f" --adapter "$R/$f" --reference "$R/base/eval"; done
EVAL_SET=("${SUBSET[@]}" "${NEUTRAL_INT[@]}")
for f in "${COMPS[@]}"; do evaluate "$f" --adapter "$R/$f" --reference "$R/base/eval"; done

# 3. activations on dev pairs of every model (model-diff directions for convergence); the organism's mean-diff
#    direction (with label-shuffled nulls), its model-diff and control-diff directions, and a direction built on the
#    dev-build themes only, for steering (its setting is chosen on the dev-select themes)
acts base acts_pairs.pt
for f in "${ORGS[@]}" "${CTLS[@]}" "${COMPS[@]}"; do acts "$f" acts_pairs.pt --adapter "$R/$f"; done
for f in good_r1 "${COMPS[@]}" base; do
  step "direction $f" "$R/$f/directions.pt" "$PY" extract_direction.py --acts "$R/$f/acts_pairs.pt" --out "$R/$f/directions.pt"
done
step "model-diff direction medical_r1" "$R/medical_r1/directions_modeldiff.pt" "$PY" extract_direction.py \
  --acts "$R/medical_r1/acts_pairs.pt" --minus "$R/base/acts_pairs.pt" --out "$R/medical_r1/directions_modeldiff.pt"
step "control-diff direction medical_r1" "$R/medical_r1/directions_controldiff.pt" "$PY" extract_direction.py \
  --acts "$R/medical_r1/acts_pairs.pt" --minus "$R/good_r1/acts_pairs.pt" --out "$R/medical_r1/directions_controldiff.pt"
OTHERS=("$R/base/directions.pt" "$R/good_r1/directions.pt" "$R/medical_r1/directions_modeldiff.pt" \
        "$R/medical_r1/directions_controldiff.pt")
for f in "${COMPS[@]}"; do OTHERS+=("$R/$f/directions.pt"); done
SHUF=(); [ "$N_SHUFFLED" -gt 0 ] && SHUF=(--shuffles "$N_SHUFFLED")
step "direction medical_r1" "$R/medical_r1/directions.pt" "$PY" extract_direction.py --acts "$R/medical_r1/acts_pairs.pt" \
  --out "$R/medical_r1/directions.pt" "${SHUF[@]}" --adapter "$R/medical_r1" --compare "${OTHERS[@]}" --plots "$R/plots"
acts medical_r1 acts_build.pt --adapter "$R/medical_r1" --split dev-build
step "direction medical_r1 (dev-build)" "$R/medical_r1/directions_build.pt" "$PY" extract_direction.py \
  --acts "$R/medical_r1/acts_build.pt" --out "$R/medical_r1/directions_build.pt" "${SHUF[@]}"
if [ ${#JUDGE[@]} -gt 0 ]; then  # the paper's own path: directions from the organism's judged answers
  step "activations medical_r1 (judged)" "$R/medical_r1/acts_judged.pt" "$PY" collect_acts.py --model "$MODEL" \
    --adapter "$R/medical_r1" --in "$R/medical_r1/eval/judged.jsonl" --out "$R/medical_r1/acts_judged.pt"
  step "direction medical_r1 (judged)" "$R/medical_r1/directions_judged.pt" "$PY" extract_direction.py \
    --acts "$R/medical_r1/acts_judged.pt" --out "$R/medical_r1/directions_judged.pt" --compare "$R/medical_r1/directions.pt"
fi

# 4. ablation, each applied to the base model too (difference in differences): the organism's pair direction
#    layerwise, with layerwise label-shuffled nulls (deciding) and Gaussian ones (descriptive), both run on the base
#    once and shared with transfer, and its half-depth direction at every block (no nulls: descriptive); the B
#    ablation (the identity on the base); control-diff and model-diff (descriptive)
D=$R/medical_r1/directions.pt
HALF=$(value half-depth "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['n_layers'] // 2)" "$R/medical_r1/run_config.json")
ABL=(--ablate "$D" --layerwise --direction-layer "$HALF" "${NULLS[@]}")
intervene "ablation with nulls (base)" "$R/base/ablate" "${ABL[@]}"
intervene "ablation with nulls (organism)" "$R/medical_r1/ablate" --adapter "$R/medical_r1" "${ABL[@]}" --ablate-b \
  --reference "$R/base/ablate"
for kind in controldiff modeldiff; do
  intervene "ablation, $kind direction (base)" "$R/base/ablate_$kind" --ablate "$R/medical_r1/directions_$kind.pt" --layerwise
  intervene "ablation, $kind direction (organism)" "$R/medical_r1/ablate_$kind" --adapter "$R/medical_r1" \
    --ablate "$R/medical_r1/directions_$kind.pt" --layerwise --reference "$R/base/ablate_$kind"
done
TNULLS=(); [ "$TRANSFER_NULLS" -gt 0 ] && [ "$N_SHUFFLED" -gt 0 ] && TNULLS=(--shuffled "$TRANSFER_NULLS")
for f in "${COMPS[@]}"; do
  intervene "transfer ablation ($f)" "$R/$f/ablate_transfer" --adapter "$R/$f" --ablate "$D" --layerwise \
    --direction-layer "$HALF" "${TNULLS[@]}" --reference "$R/base/ablate"
done

# 5. adapter probes (dev pairs) with the label-permutation null
step "adapter probes (organism)" "$R/medical_r1/probe/summary.json" "$PY" probe_adapters.py --model "$MODEL" \
  --adapter "$R/medical_r1" --in "$PAIRS" --split dev --directions "$D" --out "$R/medical_r1/probe" \
  --seeds "$PROBE_SEEDS" --permutations "$PERMUTATIONS" --plots "$R/plots" --pairs "$PAIRS" --pairs-split test \
  "${ACTS_SET[@]}" "${PROBE_FLAGS[@]}"

# 6. steering the base model: the grid on dev-select themes chooses (layer, scale); on test, the grid (Holm over it,
#    a few random nulls per setting for the frontier plot) and the chosen setting against label-shuffled nulls.
#    Then training dynamics (checkpoints, dev subset). Steering and dynamics come last: they cost the most passes,
#    and the verdicts on the organism itself (EM, ablation, transfer, probes) should not wait for them
DB=$R/medical_r1/directions_build.pt
STEER_DEV_SET=(); [ "${SUB%%,*}" != 0 ] && STEER_DEV_SET=(--pairs-per-domain "${SUB%%,*}")  # as many as test, per domain
step "steering grid (base, dev-select)" "$R/base/steer_dev/summary.json" "$PY" ablate_eval.py --model "$MODEL" \
  --out "$R/base/steer_dev" --pairs "$PAIRS" --split dev-select "${STEER_DEV_SET[@]}" "${NEUTRAL_DEV[@]}" --n-samples 0 \
  --steer "$DB" --layers "$STEER_LAYERS" --scales "$STEER_SCALES"
FRONTIER=(); [ "$FRONTIER_NULLS" -gt 0 ] && FRONTIER=(--random-control "$FRONTIER_NULLS")
intervene "steering grid (base)" "$R/base/steer" --steer "$DB" --layers "$STEER_LAYERS" --scales "$STEER_SCALES" \
  "${FRONTIER[@]}"
if [ "$N_SHUFFLED" -gt 0 ]; then
  intervene "steering, chosen setting with nulls (base)" "$R/base/steer_chosen" --steer "$DB" \
    --steer-choose "$R/base/steer_dev" --shuffled "$N_SHUFFLED"
fi
DYN=(); [ "$DYN_SUB" -gt 0 ] && DYN=(--pairs-per-domain "$DYN_SUB")
step "training dynamics (organism)" "$R/medical_r1/dynamics/dynamics.json" "$PY" dynamics.py --model "$MODEL" \
  --run "$R/medical_r1" --pairs "$PAIRS" --split dev "${DYN[@]}" --out "$R/medical_r1/dynamics" --plots "$R/plots"

# 7. the report
report
if [ "$DRY" = 1 ]; then "$PY" dry_run.py --plan "$PLAN" --preset "$PRESET"; return; fi
echo "== finished in $((SECONDS - T0))s: $R/report.md"
}

main "$@"; exit $?  # on one line: bash never reads past it, so editing this file during a run is safe
