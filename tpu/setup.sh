#!/usr/bin/env bash
# Copy the repository to every host and install it with libtpu.
#   tpu/setup.sh [--dry-run]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
run tar -C "$REPO" --exclude='.venv*' --exclude=runs --exclude=.git --exclude=__pycache__ -czf /tmp/polmjax.tgz .
run gcloud compute tpus tpu-vm scp /tmp/polmjax.tgz "$TPU_NAME":~/polmjax.tgz --zone="$ZONE" --worker=all
ssh_all 'mkdir -p ~/polmjax && tar -C ~/polmjax -xzf ~/polmjax.tgz && cd ~/polmjax &&'\
' python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e ".[tpu]" &&'\
' .venv/bin/python -c "import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)"'
