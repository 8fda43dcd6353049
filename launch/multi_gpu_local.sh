#!/usr/bin/env bash
# Train TarFlow on one machine with several GPUs. See launch/README.md.
#
#   One process driving every visible GPU (the default; no distributed setup):
#     CONFIG=configs/imagenet64_cond.py WORKDIR=/data/runs/in64 launch/multi_gpu_local.sh
#
#   N processes on this machine, each with its own share of the GPUs, joined by
#   jax.distributed through an explicit coordinator on localhost (tests the multi-host
#   code path on one box):
#     NUM_PROCESSES=2 CONFIG=configs/digits.py WORKDIR=/tmp/digits2 launch/multi_gpu_local.sh
#
# Extra arguments are appended to `python -m tarflow_jax.main`, e.g. --config.model.remat=True.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

CONFIG="${CONFIG:-configs/digits.py}"
WORKDIR="${WORKDIR:-}"
DATA_DIR="${DATA_DIR:-}"
MODE="${MODE:-train}"
NUM_PROCESSES="${NUM_PROCESSES:-1}"
PORT="${PORT:-12355}"
PYTHON="${PYTHON:-python}"
LOG_DIR="${LOG_DIR:-${REPO_ROOT}/logs/local-$(date +%Y%m%d-%H%M%S)}"
# GPUs to use: CUDA_VISIBLE_DEVICES if set, else every GPU nvidia-smi lists.
GPUS="${GPUS:-${CUDA_VISIBLE_DEVICES:-}}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"

usage() {
  cat <<EOF
Usage: [VAR=value ...] launch/multi_gpu_local.sh [--config.FIELD=VALUE ...]

  CONFIG=${CONFIG}  WORKDIR=${WORKDIR:-<unset: required>}  MODE=${MODE}
  DATA_DIR=${DATA_DIR:-<config default>}
  NUM_PROCESSES=${NUM_PROCESSES}  (1: one process sees all GPUs; N>1: N local processes,
                   GPUs split evenly, --coordinator_address=localhost:\${PORT})
  PORT=${PORT}  GPUS=${GPUS:-<all>}  PYTHON=${PYTHON}  LOG_DIR=<repo>/logs/local-<time> (N>1)
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if [[ -z "${WORKDIR}" ]]; then usage >&2; echo "multi_gpu_local.sh: set WORKDIR" >&2; exit 2; fi
[[ "${NUM_PROCESSES}" =~ ^[1-9][0-9]*$ ]] || { echo "NUM_PROCESSES must be a positive integer" >&2; exit 2; }

cd "${REPO_ROOT}"
args=(-m tarflow_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}" "--mode=${MODE}")
if [[ -n "${DATA_DIR}" ]]; then args+=("--config.dataset.data_dir=${DATA_DIR}"); fi
args+=("$@")

if [[ "${NUM_PROCESSES}" == 1 ]]; then
  # One process, every visible GPU: jax sees them all as local devices; no distributed init.
  if [[ -n "${GPUS}" ]]; then export CUDA_VISIBLE_DEVICES="${GPUS}"; fi
  echo "multi_gpu_local.sh: ${PYTHON} ${args[*]} (GPUs: ${GPUS:-all})"
  exec "${PYTHON}" "${args[@]}"
fi

# ---------------------------------------------------------------- N local processes
if [[ -z "${GPUS}" ]]; then
  if command -v nvidia-smi > /dev/null; then
    GPUS="$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)"
  fi
fi
gpu_list=()
if [[ -n "${GPUS}" ]]; then IFS=, read -r -a gpu_list <<< "${GPUS}"; fi
num_gpus=${#gpu_list[@]}
if (( num_gpus > 0 && num_gpus % NUM_PROCESSES != 0 )); then
  echo "multi_gpu_local.sh: ${num_gpus} GPUs (${GPUS}) do not split into ${NUM_PROCESSES} processes" >&2
  exit 2
fi
per_proc=$(( num_gpus / NUM_PROCESSES ))
mkdir -p "${LOG_DIR}"
echo "multi_gpu_local.sh: ${NUM_PROCESSES} processes, ${per_proc} GPU(s) each" \
     "(${num_gpus} GPUs listed; 0: CPU devices only), coordinator localhost:${PORT}, logs in ${LOG_DIR}"

pids=()
stop_all() {  # stop the processes this script started, by pid
  local pid
  for pid in "${pids[@]}"; do kill "${pid}" 2> /dev/null || true; done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for (( i = 0; i < NUM_PROCESSES; i++ )); do
  (
    if (( per_proc > 0 )); then
      mine="$(IFS=,; echo "${gpu_list[*]:i*per_proc:per_proc}")"
      export CUDA_VISIBLE_DEVICES="${mine}"
      # All of this process's visible GPUs (overrides Slurm/MPI guesses when run inside one).
      JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $(( per_proc - 1 )))"
      export JAX_LOCAL_DEVICE_IDS
    fi
    exec "${PYTHON}" "${args[@]}" --jax_distributed --coordinator_address="localhost:${PORT}" \
      --num_processes="${NUM_PROCESSES}" --process_id="${i}"
  ) > "${LOG_DIR}/process-${i}.log" 2>&1 &
  pids+=("$!")
done

echo "multi_gpu_local.sh: started pids ${pids[*]}; following process 0 (metrics are logged there)"
tail -n +1 -f "${LOG_DIR}/process-0.log" &
tail_pid=$!

status=0
live=("${pids[@]}")
while (( ${#live[@]} > 0 )); do  # the first process to fail stops the others (bash >= 5.1)
  rc=0
  done_pid=""
  wait -n -p done_pid "${live[@]}" || rc=$?
  if [[ -z "${done_pid}" ]]; then break; fi  # nothing left to wait for
  next=()
  for pid in "${live[@]}"; do if [[ "${pid}" != "${done_pid}" ]]; then next+=("${pid}"); fi; done
  live=("${next[@]}")
  if (( rc != 0 )); then
    status=${rc}
    echo "multi_gpu_local.sh: pid ${done_pid} exited with status ${rc}; stopping the others;" \
         "see ${LOG_DIR}/process-*.log" >&2
    stop_all
    break
  fi
done
wait "${pids[@]}" 2> /dev/null || true
kill "${tail_pid}" 2> /dev/null || true
exit "${status}"
