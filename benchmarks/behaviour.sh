#!/usr/bin/env bash
# Behaviour experiment: fine-tuning vs the reference's baseline vs MBS on the synthetic
# data (configs/demo.yaml: a 4-step 14-2 task, DeepLab-V3 ResNet-18 from scratch, CPU).
#
#   bash benchmarks/behaviour.sh    # the table in runs/behaviour/summary.md, the plot in fig/behaviour_synthetic.png
#                                   # (benchmarks/behaviour.md reports them)
#
# Environment: OUT (runs folder, default runs/behaviour), PYTHON (default python),
# EXTRA (more --opt overrides for every run, e.g. EXTRA=seed=1), PLOT (the plot's path).
#
# Step 0 trains cross-entropy only whatever the method (no method component acts before
# step 1): the mbs run trains it, and the other two reuse it (train.step0_checkpoint=auto
# finds it in OUT), so the three methods start step 1 from the very same model and the
# comparison isolates what the methods do.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/behaviour}
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA:-}
PLOT=${PLOT:-fig/behaviour_synthetic.png}
methods="mbs baseline finetune"

for method in $methods; do
  # shellcheck disable=SC2086
  "$PYTHON" main.py --config configs/demo.yaml --resume \
    --opt "output_dir=$OUT" "name=$method" "method.name=$method" train.step0_checkpoint=auto \
    train.qualitative_figure=null $EXTRA
done

"$PYTHON" -m analysis.report "$OUT/finetune" "$OUT/baseline" "$OUT/mbs" \
  --out "$OUT/summary.md" --plot "$PLOT"
echo "table: $OUT/summary.md, plot: $PLOT"
