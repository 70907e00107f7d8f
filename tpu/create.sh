#!/usr/bin/env bash
# Create the TPU slice (QUEUED=1: as a queued resource, which waits for capacity instead of failing).
#   tpu/create.sh [--dry-run]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
if [[ "${QUEUED:-0}" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" ${SPOT:+--spot}
  note "queued; watch: $(quote gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE")"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" ${SPOT:+--spot}
fi
