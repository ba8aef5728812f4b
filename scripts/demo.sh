#!/usr/bin/env bash
# The embedded default, offline: generated images, a small model trained on them by the project's
# own code (random MobileNet base, NOT ImageNet: it has never seen a real cat or dog), and the
# scoring job on the DirectRunner. Outputs land in demo_output/run/ (DEMO_OUTPUT=DIR: in DIR/run/;
# a model already in DIR/model/ is scored with instead of training one).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
py=.venv/bin/python
out="${DEMO_OUTPUT:-demo_output}"
if [ ! -d "$out/images" ]; then
  $py -m model.synthetic --folders "$out/train" --per-class 60 --test "$out/images" --test-count 200
  : > "$out/images/201.jpg"                              # a 0-byte file
  echo "not an image" > "$out/images/202.jpg"            # a text file named .jpg
fi
if [ ! -f "$out/model/metadata.json" ]; then
  echo "training the demo model (random base, generated data; about a minute)..."
  $py -m model.train --data "$out/train" --output "$out/model" --base mobilenet --alpha 0.25 \
    --base-weights none --input-size 64 --epochs 4 --learning-rate 0.01 --no-augment \
    --fine-tune-layers 20 --fine-tune-epochs 2 --model-version demo-untrained-base-v1
fi
$py -m pipeline.score --input "$out/images/*" --model-dir "$out/model" --output "$out/run" \
  --overwrite --min-confidence 0.6 "$@"
echo "first rows of $out/run/submission.csv:"
head -4 "$out/run/submission.csv"
