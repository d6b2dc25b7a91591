#!/usr/bin/env bash
# Shared by the launch/ scripts: print every command before running it, fail early and clearly.
# Environment overrides understood by all scripts:
#   CONFIG        training config (default configs/tiny.yaml)
#   MASTER_ADDR   address of rank 0            MASTER_PORT   its TCP port (default: a free port of this
#                 machine, where rank 0 runs; a port that is set and in use here is refused at once)
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME    network interface for the collectives
#   DIST_TIMEOUT  seconds before a collective with a dead or stuck peer fails (train.dist_timeout_s)
#   DRY_RUN=1     print the command and exit without running it
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG=${CONFIG:-configs/tiny.yaml}
MASTER_PORT=${MASTER_PORT:-}
DIST_TIMEOUT=${DIST_TIMEOUT:-600}
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python3)}

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

run() {
  echo "+ $*" >&2
  if [ "${DRY_RUN:-0}" = "1" ]; then
    return 0
  fi
  "$@"
}

# run_requeueable CMD...: run a training job step under SLURM; when it was stopped by a signal after saving
# a checkpoint (exit 128 + signal: the time-limit warning asked for with --signal, or a pre-emption), put
# the job back in the queue, where it resumes with train.resume=auto. Any other failure ends the job.
run_requeueable() {
  local rc=0
  run "$@" || rc=$?
  if [ "$rc" -gt 128 ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${S2MOE_NO_REQUEUE:-0}" != "1" ]; then
    echo "$(basename "$0"): training stopped by signal $((rc - 128)) after saving a checkpoint; requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  return "$rc"
}

require_file() {  # require_file WHAT PATH HINT
  [ -f "$2" ] || [ -f "$REPO_ROOT/$2" ] || die "$1 '$2' does not exist; $3"
}

require_cmd() {  # require_cmd NAME HINT
  command -v "$1" > /dev/null 2>&1 || die "'$1' is not on PATH; $2"
}

# The data folder the config (plus overrides) trains on must be prepared first.
require_data() {
  local dir
  dir=$(cd "$REPO_ROOT" && "$PYTHON" -c 'import sys; from s2moe_ds.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).data.data_dir)' "$CONFIG" "$@") \
    || die "could not read config '$CONFIG' with overrides: $*"
  if [ ! -f "$dir/meta.json" ] && [ ! -f "$REPO_ROOT/$dir/meta.json" ]; then
    die "data folder '$dir' is not prepared (no meta.json); run: s2moe prepare --config $CONFIG $*"
  fi
}

# CONFIG may be a path or a shipped config's name (CONFIG=tiny): what `s2moe train --config` accepts.
require_config() {
  [ -f "$CONFIG" ] || [ -f "$REPO_ROOT/$CONFIG" ] \
    || (cd "$REPO_ROOT" && "$PYTHON" -c 'import sys; from s2moe_ds.config import resolve_path; sys.exit(not resolve_path(sys.argv[1]).is_file())' "$CONFIG") 2> /dev/null \
    || die "config '$CONFIG' does not exist; pass CONFIG=configs/<name>.yaml or a shipped name such as CONFIG=tiny (see configs/)"
}

# is_local ADDR: whether ADDR (empty: unset) names this machine
is_local() {
  case "$1" in
    "" | 127.* | localhost | ::1 | "$(hostname)" | "$(hostname -s 2> /dev/null)" | "$(hostname -f 2> /dev/null)") return 0 ;;
  esac
  hostname -I 2> /dev/null | tr ' ' '\n' | grep -qxF -- "$1"
}

# choose_port DEFAULT: MASTER_PORT unset -> DEFAULT: 'free' (a free port of this machine) or a fixed port (when
# every node picks its own and all must agree); the port, with rank 0 on this machine, is refused at once when
# a process here already listens on it (a second job on one port died minutes later in gloo, naming no port)
choose_port() {
  if [ -z "$MASTER_PORT" ] && [ "$1" = "free" ]; then
    MASTER_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])') \
      || die "could not pick a free TCP port; set MASTER_PORT"
    return 0
  fi
  MASTER_PORT=${MASTER_PORT:-$1}
  if is_local "${MASTER_ADDR:-}" && ! "$PYTHON" -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1])))' "$MASTER_PORT" 2> /dev/null; then
    die "MASTER_PORT $MASTER_PORT is already in use on this machine (another job or a leftover process listens on it); unset MASTER_PORT to pick a free port, or choose another"
  fi
}

check_common() {
  require_config
  [ -z "$MASTER_PORT" ] || [[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a TCP port number, got '$MASTER_PORT'"
  [[ "$DIST_TIMEOUT" =~ ^[0-9]+$ ]] || die "DIST_TIMEOUT must be whole seconds, got '$DIST_TIMEOUT'"
}
