#!/usr/bin/env bash
# Reproduce the published CISS protocols, then write one comparison table.
#
#   GPUS=4 VOC_ROOT=data ADE_ROOT=data bash main.sh voc        # VOC, DeepLab-V3 R101
#   GPUS=4 bash main.sh ade                                     # ADE20K, DeepLab-V3 R101
#   GPUS=4 bash main.sh voc_vit | ade_vit                       # Segmenter ViT-B/16 (the paper's main model)
#   METHOD=mib bash main.sh voc                                 # MiB (or plop, baseline, finetune) instead of MBS
#   METHOD="mbs mib plop" bash main.sh voc                      # each method in turn, one table for them all
#   DRY_RUN=1 bash main.sh all                                  # print the commands only
#
# Environment: GPUS (processes per node, default 1), VOC_ROOT / ADE_ROOT (data roots,
# default data), OUT (runs folder, default runs), METHOD (one or several, space-separated, of:
# mbs, baseline (the reference's non-MBS variant), finetune, mib, plop; default mbs),
# EXTRA (more --opt overrides, e.g. "train.amp=fp16"). Every run is launched with
# --resume, so re-running main.sh after an interruption continues where it stopped, and with
# train.step0_checkpoint=auto: tasks (and methods) that share step 0 train it once; the
# families run one after the other (15-1 then 15-5; 100-50, 100-10, 100-5). With several
# methods, each runs the whole suite in turn (the method is in every run name), and one summary,
# OUT/summary_<suite>_<methods joined by ->.md, sets them beside each other and the published numbers.
# After a change of config or EXTRA that changes the experiment, a run folder with finished
# steps refuses to continue (naming the differing keys): give the new recipe another OUT.
# `sh main.sh` runs dash on Debian/Ubuntu, which has neither pipefail nor arrays: run under bash instead.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
cd "$(dirname "$0")"

suite=${1:-voc}
GPUS=${GPUS:-1}
VOC_ROOT=${VOC_ROOT:-data}
ADE_ROOT=${ADE_ROOT:-data}
OUT=${OUT:-runs}
METHOD=${METHOD:-mbs}
EXTRA=${EXTRA:-}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}
# The list of methods; read -a splits on blanks without glob expansion.
read -r -a methods <<< "$METHOD"
if [ "${#methods[@]}" -eq 0 ]; then
  echo "METHOD is empty: name one or more of mbs, baseline, finetune, mib, plop" >&2
  exit 2
fi

VOC_TASKS="15-1 15-5 10-1 19-1 5-3 2-2"
ADE_TASKS="100-50 100-10 100-5 50-50"
run_dirs=()

launch() {  # config name overrides...
  local config=$1 name=$2
  shift 2
  local cmd
  if [ "$GPUS" -gt 1 ]; then
    cmd=(torchrun --standalone --nproc_per_node="$GPUS" main.py)
  else
    cmd=("$PYTHON" main.py)
  fi
  cmd+=(--config "$config" --resume --opt "name=$name" "output_dir=$OUT" "method.name=$method"
        "train.step0_checkpoint=auto" "$@")
  # shellcheck disable=SC2206
  [ -n "$EXTRA" ] && cmd+=($EXTRA)
  echo "+ ${cmd[*]}"
  [ "$DRY_RUN" = 1 ] || "${cmd[@]}"
  run_dirs+=("$OUT/$name")
}

voc_suite() {  # config tag
  for task in $VOC_TASKS; do
    for setting in overlapped disjoint; do
      launch "$1" "voc_${task}_${setting}_$2_${method}" "data.root=$VOC_ROOT" "data.task=$task" "data.setting=$setting"
    done
  done
}

ade_suite() {  # config tag
  for task in $ADE_TASKS; do
    launch "$1" "ade_${task}_$2_${method}" "data.root=$ADE_ROOT" "data.task=$task"
  done
}

run_suite() {  # the suite's runs of one method (launch() reads $method, set by the loop below)
  case "$suite" in
    voc) voc_suite configs/voc.yaml r101 ;;
    ade) ade_suite configs/ade20k.yaml r101 ;;
    voc_vit) voc_suite configs/voc_vit.yaml vitb16 ;;
    ade_vit) ade_suite configs/ade20k_vit.yaml vitb16 ;;
    all)
      voc_suite configs/voc.yaml r101; ade_suite configs/ade20k.yaml r101
      voc_suite configs/voc_vit.yaml vitb16; ade_suite configs/ade20k_vit.yaml vitb16 ;;
    *) echo "unknown suite '$suite': use voc, ade, voc_vit, ade_vit or all" >&2; exit 2 ;;
  esac
}

for method in "${methods[@]}"; do
  run_suite
done

# The tables (Markdown + CSV), the curves, and the published numbers beside every run of the same protocol.
summary="$OUT/summary_${suite}_$(IFS=-; echo "${methods[*]}")"
echo "+ $PYTHON -m analysis.report ${run_dirs[*]} --out $summary.md --plot $summary.png --published"
if [ "$DRY_RUN" != 1 ]; then
  "$PYTHON" -m analysis.report "${run_dirs[@]}" --out "$summary.md" --plot "$summary.png" --published
  cat "$summary.md"
  echo "results: $summary.md, $summary.csv (one line per run), $summary.png (mIoU after every step)"
fi
