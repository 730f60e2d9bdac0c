#!/usr/bin/env bash
# N processes of a g2e-jax job on this machine, each with its own share of the CPU (or of the GPUs),
# coordinated by JAX's distributed runtime over localhost. Useful to test multi-host code paths.
#
#   launch/local.sh 2 --config configs/tiny.py --workdir runs/local --config.model.path=...     # train
#   launch/local.sh 2 eval --config configs/mmeb_eval.py --config.model.path=... ...           # or mine, embed
#
# Each process gets G = ${DEVICES_PER_PROCESS:-4} simulated CPU devices unless JAX finds accelerators.
set -euo pipefail
n=${1:?usage: launch/local.sh NUM_PROCESSES [train|eval|mine|embed] g2e-jax-args...}
shift
cmd=train
case "${1:-}" in train | eval | mine | embed) cmd=$1; shift ;; esac
port=${PORT:-$((20000 + RANDOM % 20000))}
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}}"
pids=()
for ((i = 0; i < n; i++)); do
  g2e-jax "$cmd" "$@" --config.distributed.coordinator=127.0.0.1:"$port" \
    --config.distributed.num_processes="$n" --config.distributed.process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
