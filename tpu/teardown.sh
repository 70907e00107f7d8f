#!/usr/bin/env bash
# Delete the slice (and its queued resource, if it was created as one).
#   tpu/teardown.sh [--dry-run]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
if [[ "${QUEUED:-0}" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
fi
