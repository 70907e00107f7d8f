#!/usr/bin/env bash
# Delete the slice (and its queued resource, if it was created as one).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
if [[ "${QUEUED:-0}" == 1 ]]; then
  gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" --force --quiet
else
  gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
fi
