#!/usr/bin/env bash
# Runs `g2e-jax train` (or `eval`, `mine`, `embed`: name it after ZONE) on every worker of a Cloud TPU VM pod slice. On TPU, JAX discovers the
# coordinator and the process ids itself (jax.distributed.initialize() with no arguments).
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config configs/qwen2vl_2b_saha.py --workdir gs://bucket/runs/saha_2b \
#       --config.model.path=/mnt/models/Qwen2-VL-2B-Instruct --config.data.clusters_dir=/mnt/mined ...
#
# The repository must be at the same path on every worker (e.g. cloned by a setup step), with
# `pip install -e .` done there; data and model paths must be readable from every worker.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE g2e-jax-train-args...}
zone=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE g2e-jax-train-args...}
shift 2
cmd=train
case "${1:-}" in train | eval | mine | embed) cmd=$1; shift ;; esac
repo=${REPO_DIR:-$(pwd)}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd $(printf %q "$repo") && . .venv/bin/activate && g2e-jax $cmd$args"
