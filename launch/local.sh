#!/usr/bin/env bash
# Single-host launch: ./launch/local.sh configs/shapes.py:stage=a workdirs/shapes_a [--config.FIELD=VALUE ...]
# Rerunning the same command resumes from the workdir's latest checkpoint.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]}
workdir=${2:?usage: launch/local.sh CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]}
shift 2
exec python -m wurst_jax.main --config="$config" --workdir="$workdir" "$@"
