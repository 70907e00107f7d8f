# Shared settings for the tpu/ scripts (sourced).
TPU_NAME=${TPU_NAME:-polmjax}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-32}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }
