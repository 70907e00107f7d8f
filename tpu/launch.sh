#!/usr/bin/env bash
# Run `polmjax <algo> <experiment> [--set ...]` on every host; the algorithm is the experiment's folder.
#   tpu/launch.sh experiments/sft/qwen3_1p7b_tulu3.py --set train.run_dir=/mnt/shared/runs/q3
set -euo pipefail
source "$(dirname "$0")/_env.sh"
experiment=$1; shift
algo=$(basename "$(dirname "$experiment")")
args=$(printf ' %q' "$@")
ssh_all "cd ~/polmjax && nohup .venv/bin/polmjax $algo $experiment$args > ~/polmjax_run.log 2>&1 &
  sleep 2; tail -n 5 ~/polmjax_run.log"
echo "logs: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/polmjax_run.log'"
