#!/usr/bin/env bash
# Create the TPU slice (QUEUED=1: as a queued resource, which waits for capacity instead of failing).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
if [[ "${QUEUED:-0}" == 1 ]]; then
  gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" ${SPOT:+--spot}
  echo "queued; watch: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$ZONE"
else
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" ${SPOT:+--spot}
fi
