#!/usr/bin/env bash
# Behaviour experiment: fine-tuning vs the reference's baseline vs MBS on the synthetic
# data (configs/demo.yaml: a 4-step 14-2 task, DeepLab-V3 ResNet-18 from scratch, CPU).
#
#   bash benchmarks/behaviour.sh            # writes benchmarks/behaviour.md and fig/behaviour_synthetic.png
#
# Environment: OUT (runs folder, default runs/behaviour), PYTHON (default python),
# EXTRA (more --opt overrides for every run).
#
# Step 0 trains cross-entropy only whatever the method (no method component acts before
# step 1), so it is trained once, in the mbs run, and its checkpoint is copied into the
# other runs, which then continue with --resume: the three methods start step 1 from
# the very same model, and the comparison isolates what the methods do.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/behaviour}
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA:-}
methods="mbs baseline finetune"

for method in $methods; do
  run="$OUT/$method"
  if [ "$method" != mbs ] && [ ! -e "$run/checkpoints/step0.pt" ]; then
    mkdir -p "$run/checkpoints"
    cp "$OUT/mbs/checkpoints/step0.pt" "$run/checkpoints/step0.pt"
  fi
  # shellcheck disable=SC2086
  "$PYTHON" main.py --config configs/demo.yaml --resume \
    --opt "output_dir=$OUT" "name=$method" "method.name=$method" $EXTRA
done

"$PYTHON" -m utils.report "$OUT/finetune" "$OUT/baseline" "$OUT/mbs" \
  --out "$OUT/summary.md" --plot fig/behaviour_synthetic.png
echo "table: $OUT/summary.md, plot: fig/behaviour_synthetic.png"
