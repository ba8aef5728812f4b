#!/usr/bin/env bash
# Nightly petscore on Dataflow: service accounts, image, Flex Template, Cloud Scheduler job.
#
#   deploy/nightly.sh setup-iam   create the worker and scheduler service accounts (least privilege)
#   deploy/nightly.sh build       build and push the image (Cloud Build), then the Flex Template spec
#   deploy/nightly.sh schedule    create or update the Cloud Scheduler job (02:00 UTC, scores yesterday)
#   deploy/nightly.sh run-now     launch the template once, now (a backfill: RUN_DATE=2026-11-21)
#   deploy/nightly.sh tables      create or update the BigQuery dataset and its external tables over
#                                 every night's outputs (once a night has written them)
#   deploy/nightly.sh promote     replace MODEL_DIR with CHALLENGER once it passed PROMOTE_AFTER nights
#                                 under MAX_DISAGREEMENT (or COMPARE_JSON says "B better"), then
#                                 schedule the nights without a challenger
#
# Configure with environment variables (defaults in brackets):
#   PROJECT, REGION [europe-west1], BUCKET (gs://… without trailing slash), PROFILE [gpu|cpu],
#   MODEL_DIR [$BUCKET/models/current], INPUT [$BUCKET/incoming/dt={run_date}/*.jpg],
#   OUTPUT [$BUCKET/scores/dt={run_date}], SKIP_SCORED [$BUCKET/scores/dt=*],
#   COMPARE_TO [$BUCKET/scores/dt=*] (drift against earlier committed nights),
#   TAG [git short hash], SCHEDULE [0 2 * * *], RUN_DATE [yesterday],
#   OVERWRITE [false] (true: run-now replaces the outputs of an earlier or killed run of that night),
#   CHALLENGER [none] (a candidate model scored beside MODEL_DIR each night, e.g. $BUCKET/models/candidate),
#   PROMOTE_AFTER [7], MAX_DISAGREEMENT [0.02], COMPARE_JSON [none] (model.compare's JSON, the
#   candidate as model B), DATASET [petscore], BQ_LOCATION [$REGION], PYTHON [.venv/bin/python]
# Credentials: whatever gcloud is logged in as (ADC); nothing is stored in this script.
set -euo pipefail

: "${PROJECT:?set PROJECT}"
: "${BUCKET:?set BUCKET, e.g. gs://my-petscore}"
REGION="${REGION:-europe-west1}"
PROFILE="${PROFILE:-gpu}"
MODEL_DIR="${MODEL_DIR:-$BUCKET/models/current}"
DATE='{run_date}'  # replaced by the pipeline with --run-date at launch
INPUT="${INPUT:-$BUCKET/incoming/dt=$DATE/*.jpg}"
OUTPUT="${OUTPUT:-$BUCKET/scores/dt=$DATE}"
SCORES="${OUTPUT%%/dt=*}"  # where every night's prefix lies: tables and promote read them all
# Incremental: skip images an earlier committed night already scored with the same model version.
# Only the nights' completion records are read unless a night's paths can overlap tonight's.
SKIP_SCORED="${SKIP_SCORED:-$BUCKET/scores/dt=*}"
# Drift: tonight's profile against the earlier committed nights' records (no predictions reread).
COMPARE_TO="${COMPARE_TO:-$BUCKET/scores/dt=*}"
RUN_DATE="${RUN_DATE:-yesterday}"
OVERWRITE="${OVERWRITE:-false}"
CHALLENGER="${CHALLENGER:-}"
PROMOTE_AFTER="${PROMOTE_AFTER:-7}"
MAX_DISAGREEMENT="${MAX_DISAGREEMENT:-0.02}"
COMPARE_JSON="${COMPARE_JSON:-}"
DATASET="${DATASET:-petscore}"
BQ_LOCATION="${BQ_LOCATION:-$REGION}"
SCHEDULE="${SCHEDULE:-0 2 * * *}"
TAG="${TAG:-$(git rev-parse --short HEAD)}"
REPOSITORY="petscore"
IMAGE="$REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/petscore:$TAG"
TEMPLATE="$BUCKET/templates/petscore-$TAG.json"
WORKER_SA="petscore-worker@$PROJECT.iam.gserviceaccount.com"
SCHEDULER_SA="petscore-scheduler@$PROJECT.iam.gserviceaccount.com"
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-$HERE/../.venv/bin/python}"
# Each output's shards end in their own name (part-00000-of-00002.predictions.parquet), so one
# wildcard, all BigQuery allows in a URI, selects that output of every night.
OUTPUTS="predictions errors challenger-predictions challenger-errors"

# Runner and machine settings per profile. GPU: one T4 per N1 VM, driver installed by Dataflow,
# one model per machine (share_model_across_processes) so SDK processes do not each fill the GPU.
profile_environment() {
  case "$PROFILE" in
    gpu) printf '%s' '"machineType": "n1-standard-8", "maxWorkers": 4,
      "additionalExperiments": ["use_runner_v2",
        "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"]' ;;
    cpu) printf '%s' '"machineType": "n2-standard-4", "maxWorkers": 4,
      "additionalExperiments": ["use_runner_v2"]' ;;
    *) echo "PROFILE must be gpu or cpu" >&2; exit 2 ;;
  esac
}

share_model() { [ "$PROFILE" = gpu ] && echo true || echo false; }

# The challenger's launch parameter, when there is one.
challenger_parameter() {
  if [ -n "$CHALLENGER" ]; then
    printf ',\n                 "challenger_model": "%s"' "$CHALLENGER"
  fi
}

launch_body() {
  local job_name="$1"
  cat <<JSON
{"launchParameter": {
  "jobName": "$job_name",
  "containerSpecGcsPath": "$TEMPLATE",
  "parameters": {"input": "$INPUT", "model_dir": "$MODEL_DIR", "output": "$OUTPUT",
                 "skip_scored": "$SKIP_SCORED", "compare_to": "$COMPARE_TO",
                 "run_date": "$RUN_DATE", "overwrite": "$OVERWRITE",
                 "share_model_across_processes": "$(share_model)"$(challenger_parameter)},
  "environment": {"serviceAccountEmail": "$WORKER_SA", "tempLocation": "$BUCKET/tmp",
                  "sdkContainerImage": "$IMAGE", $(profile_environment)}}}
JSON
}

setup_iam() {
  gcloud iam service-accounts create petscore-worker --project "$PROJECT" \
    --display-name "petscore Dataflow workers" || true
  gcloud iam service-accounts create petscore-scheduler --project "$PROJECT" \
    --display-name "petscore nightly launcher" || true
  # Workers: run Dataflow work items, read images and the model, write outputs, pull the image.
  gcloud projects add-iam-policy-binding "$PROJECT" --member "serviceAccount:$WORKER_SA" \
    --role roles/dataflow.worker --condition None
  gcloud storage buckets add-iam-policy-binding "$BUCKET" --member "serviceAccount:$WORKER_SA" \
    --role roles/storage.objectUser
  gcloud artifacts repositories add-iam-policy-binding "$REPOSITORY" --project "$PROJECT" \
    --location "$REGION" --member "serviceAccount:$WORKER_SA" --role roles/artifactregistry.reader
  # Scheduler: launch jobs and act as the worker account, nothing else.
  gcloud projects add-iam-policy-binding "$PROJECT" --member "serviceAccount:$SCHEDULER_SA" \
    --role roles/dataflow.developer --condition None
  gcloud iam service-accounts add-iam-policy-binding "$WORKER_SA" --project "$PROJECT" \
    --member "serviceAccount:$SCHEDULER_SA" --role roles/iam.serviceAccountUser
  gcloud storage buckets add-iam-policy-binding "$BUCKET" --member "serviceAccount:$SCHEDULER_SA" \
    --role roles/storage.objectViewer
}

build() {
  gcloud artifacts repositories describe "$REPOSITORY" --project "$PROJECT" --location "$REGION" \
    >/dev/null 2>&1 || gcloud artifacts repositories create "$REPOSITORY" --project "$PROJECT" \
    --location "$REGION" --repository-format docker
  local config
  config="$(mktemp)"
  printf 'steps:\n- name: gcr.io/cloud-builders/docker\n  args: [build, -f, deploy/Dockerfile, -t, "%s", .]\nimages: ["%s"]\n' \
    "$IMAGE" "$IMAGE" > "$config"
  gcloud builds submit "$HERE/.." --project "$PROJECT" --region "$REGION" --config "$config"
  rm -f "$config"
  gcloud dataflow flex-template build "$TEMPLATE" --project "$PROJECT" \
    --image "$IMAGE" --sdk-language PYTHON --metadata-file "$HERE/flex-template/metadata.json"
}

schedule() {
  local uri="https://dataflow.googleapis.com/v1b3/projects/$PROJECT/locations/$REGION/flexTemplates:launch"
  local verb=create
  if gcloud scheduler jobs describe petscore-nightly --project "$PROJECT" --location "$REGION" \
      >/dev/null 2>&1; then
    verb=update
  fi
  gcloud scheduler jobs "$verb" http petscore-nightly --project "$PROJECT" --location "$REGION" \
    --schedule "$SCHEDULE" --time-zone UTC --uri "$uri" --http-method POST \
    --oauth-service-account-email "$SCHEDULER_SA" \
    --oauth-token-scope https://www.googleapis.com/auth/cloud-platform \
    --headers Content-Type=application/json \
    --message-body "$(launch_body petscore-nightly)"
}

run_now() {
  local body
  body="$(launch_body "petscore-manual-$(date -u +%Y%m%d-%H%M%S)")"
  curl --fail --silent --show-error -X POST \
    -H "Authorization: Bearer $(gcloud auth print-access-token)" \
    -H "Content-Type: application/json" \
    "https://dataflow.googleapis.com/v1b3/projects/$PROJECT/locations/$REGION/flexTemplates:launch" \
    -d "$body"
}

# BigQuery: one dataset, one external table per output over every night's shards, partitioned by
# the nights' dt=YYYY-MM-DD folders. Idempotent: an existing table gets the definition again.
tables() {
  [ "$SCORES" != "$OUTPUT" ] || { echo "tables needs OUTPUT=PREFIX/dt={run_date}: its partitions" >&2; exit 2; }
  bq show --format=none --dataset "$PROJECT:$DATASET" >/dev/null 2>&1 ||
    bq mk --dataset --location "$BQ_LOCATION" --description "petscore nightly outputs" "$PROJECT:$DATASET"
  local output table definition
  for output in $OUTPUTS; do
    table="$PROJECT:$DATASET.${output//-/_}"
    if ! gcloud storage ls "$SCORES/**.$output.parquet" >/dev/null 2>&1; then
      echo "no night has written $output yet: run tables again after one has" >&2
      continue
    fi
    definition="$(mktemp)"
    bq mkdef --source_format=PARQUET --parquet_enable_list_inference=true \
      --hive_partitioning_mode=CUSTOM --hive_partitioning_source_uri_prefix="$SCORES/{dt:DATE}" \
      "$SCORES/*.$output.parquet" > "$definition"
    if bq show --format=none "$table" >/dev/null 2>&1; then
      bq update --external_table_definition="$definition" "$table"
    else
      bq mk --table --external_table_definition="$definition" "$table"
    fi
    rm -f "$definition"
  done
}

# Promotion: the candidate replaces MODEL_DIR (the model it replaces is kept for a roll-back),
# then the schedule scores without a challenger until the next candidate.
promote() {
  : "${CHALLENGER:?set CHALLENGER to the candidate model directory, e.g. $BUCKET/models/candidate}"
  "$PYTHON" -m pipeline.promotion --nights "$SCORES/dt=*" --candidate "$CHALLENGER" \
    --after "$PROMOTE_AFTER" --max-disagreement "$MAX_DISAGREEMENT" ${COMPARE_JSON:+--compare "$COMPARE_JSON"}
  local previous
  previous="$BUCKET/models/previous-$(date -u +%Y%m%dT%H%M%SZ)"
  gcloud storage rsync --recursive "$MODEL_DIR" "$previous"
  gcloud storage rsync --recursive --delete-unmatched-destination-objects "$CHALLENGER" "$MODEL_DIR"
  CHALLENGER=""
  schedule
  echo "promoted $MODEL_DIR; the model it replaced is in $previous"
}

case "${1:-}" in
  setup-iam) setup_iam ;;
  build) build ;;
  schedule) schedule ;;
  run-now) run_now ;;
  tables) tables ;;
  promote) promote ;;
  launch-body) launch_body petscore-nightly ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
