#!/usr/bin/env bash
# Training on a Cloud TPU pod slice: the same command on every worker VM.
#
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/stage_c.py:clip=/models/clip-bigg,effnet=/models/effnet \
#       gs://bucket/stage_c --config.mesh.fsdp=8
#
# The repo and its .venv must already be on every worker at ~/wurst_jax (e.g. with
# `gcloud compute tpus tpu-vm scp --worker=all` or a startup script). JAX detects the pod
# (`--multihost`); the workdir should be a GCS path that every worker can write. Rerun the same
# command after a preemption or maintenance event to resume.
set -euo pipefail
usage='usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]'
tpu=${1:?$usage}
zone=${2:?$usage}
config=${3:?$usage}
workdir=${4:?$usage}
shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/wurst_jax && .venv/bin/python -m wurst_jax.main --multihost --config=$(printf '%q' "$config") \
    --workdir=$(printf '%q' "$workdir")$extra"
