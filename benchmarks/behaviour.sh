#!/usr/bin/env bash
# Behaviour experiment: fine-tuning vs the reference's baseline vs MBS vs MiB vs PLOP on the synthetic
# data (configs/demo.yaml: a 4-step 14-2 task, DeepLab-V3 ResNet-18 from scratch, CPU).
#
#   bash benchmarks/behaviour.sh    # the table in runs/behaviour/summary.md, the plot in fig/behaviour_synthetic.png
#                                   # (benchmarks/behaviour.md reports them)
#
# Environment: OUT (runs folder, default runs/behaviour), PYTHON (default python),
# EXTRA (more --opt overrides for every run, e.g. EXTRA=seed=1), PLOT (the plot's path).
#
# Step 0 is cross-entropy alone for every method (no method component acts before step 1), but it is
# trained twice, once per reduction of that cross-entropy: MBS's step 0 averages it over the labelled
# pixels, MiB's and PLOP's over all pixels (shared/docs/BASELINES_SPEC.md section 0). The mbs run trains
# the first and baseline / finetune reuse it; the mib run trains the second and plop reuses it
# (train.step0_checkpoint=auto finds the run of the same step-0 recipe in OUT). So the methods of one family
# start step 1 from the very same model, and the comparison within a family isolates what the methods do.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/behaviour}
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA:-}
PLOT=${PLOT:-fig/behaviour_synthetic.png}
# mbs before baseline / finetune, and mib before plop: the first of each family trains its step 0.
methods="mbs baseline finetune mib plop"

for method in $methods; do
  # shellcheck disable=SC2086
  "$PYTHON" main.py --config configs/demo.yaml --resume \
    --opt "output_dir=$OUT" "name=$method" "method.name=$method" train.step0_checkpoint=auto \
    train.qualitative_figure=null $EXTRA
done

"$PYTHON" -m analysis.report "$OUT/finetune" "$OUT/baseline" "$OUT/mbs" "$OUT/mib" "$OUT/plop" \
  --out "$OUT/summary.md" --plot "$PLOT"

# The two step-0 results, and which run trained each one: appended to the summary.
"$PYTHON" - "$OUT" $methods >> "$OUT/summary.md" <<'PY'
import json
import sys
from pathlib import Path

out, methods = Path(sys.argv[1]), sys.argv[2:]
print("\n## Step 0, trained twice\n")
print("Step 0 is cross-entropy alone for every method, but MBS, the baseline and fine-tuning average it over "
      "the labelled pixels, while MiB and PLOP average it over all pixels (ignored ones counting 0; "
      "BASELINES_SPEC section 0). These are two trainings, so there are two step-0 models: the mbs run trains "
      "the first (baseline and finetune reuse it), the mib run the second (plop reuses it).\n")
print("| run | step 0 old / all | step 0 old w/o bg | step 0 |")
print("|---|---|---|---|")
for method in methods:
    step0 = json.loads((out / method / "results.json").read_text())["steps"][0]
    origin = f"reused from {step0['reused_from']}" if step0.get("reused_from") else "trained in this run"
    print(f"| {method} | {100 * step0['miou_all']:.2f} | {100 * step0['miou_old_no_bg']:.2f} | {origin} |")
PY
echo "table: $OUT/summary.md, plot: $PLOT"
