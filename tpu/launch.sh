#!/usr/bin/env bash
# Run `polmjax <algo> <experiment> [--set ...]` on every host; the algorithm is the experiment's folder.
#   tpu/launch.sh [--dry-run] experiments/sft/qwen3_1p7b_tulu3.py --set train.run_dir=/mnt/shared/runs/q3
set -euo pipefail
source "$(dirname "$0")/_env.sh"
(($#)) || die "usage: tpu/launch.sh [--dry-run] experiments/<algo>/<name>.py [--set key=value ...]"
experiment "$1"; shift
ssh_all "cd ~/polmjax && nohup .venv/bin/polmjax $(quote "$ALGO" "$EXPERIMENT" "$@") > ~/polmjax_run.log 2>&1 &\
 sleep 2; tail -n 5 ~/polmjax_run.log"
note "logs: $(quote gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=0 --command='tail -f ~/polmjax_run.log')"
