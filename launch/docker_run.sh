#!/usr/bin/env bash
# Run the project image with the data, runs (checkpoints + TensorBoard logs) folders mounted; the
# arguments are the command to run in the container (default: the image's CMD).
#   IMAGE=s2moe_ds:gpu DATA=/scratch/data RUNS=/scratch/runs bash launch/docker_run.sh \
#       env CONFIG=configs/text8_s2moe.yaml bash launch/single_node.sh
# In the container DATA is data_cache/ and RUNS is runs/ of the repository copy, so the configs'
# default paths (data_cache/<dataset>, runs/<name>) land in the mounted folders.
#   IMAGE=s2moe_ds:cpu bash launch/docker_run.sh          # the CPU demo, outputs in ./runs
# GPUS=all (default for a :gpu image) passes the GPUs through; TB_PORT publishes TensorBoard's port, on
# every host address or on TB_ADDR only (TB_ADDR=127.0.0.1: this host's loopback).
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
IMAGE=${IMAGE:-s2moe_ds:cpu}
DATA=${DATA:-$REPO_ROOT/data_cache}
RUNS=${RUNS:-$REPO_ROOT/runs}
TB_PORT=${TB_PORT:-6006}
TB_ADDR=${TB_ADDR:-}
case "$IMAGE" in *gpu*) GPUS=${GPUS:-all} ;; *) GPUS=${GPUS:-} ;; esac
[ "${DRY_RUN:-0}" = "1" ] || require_cmd docker "install Docker (and the NVIDIA container toolkit for GPU images)"
[ -d "$DATA" ] || die "DATA folder '$DATA' does not exist; prepare data first (s2moe prepare) or set DATA=<folder>"
mkdir -p "$RUNS" || die "cannot create RUNS folder '$RUNS'"
W=/workspace/s2moe_ds
args=(run --rm --ipc=host --shm-size=8g -v "$(cd "$DATA" && pwd):$W/data_cache" -v "$(cd "$RUNS" && pwd):$W/runs"
  -p "${TB_ADDR:+$TB_ADDR:}$TB_PORT:6006" -e MASTER_PORT -e DIST_TIMEOUT -e CONFIG)
[ -n "$GPUS" ] && args+=(--gpus "$GPUS")
[ -t 0 ] && args+=(-it)
run docker "${args[@]}" "$IMAGE" "$@"
