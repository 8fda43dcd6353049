#!/usr/bin/env bash
# Train TarFlow on a Cloud TPU VM slice (single- or multi-host): create the slice, copy this
# repository to every worker, install, run one process per host with --jax_distributed,
# tail the log, delete the slice. Checkpoints/metrics go to GCS (WORKDIR), data come from a
# TFDS directory on GCS (DATA_DIR). See launch/README.md.
#
#   TPU_NAME=tarflow ZONE=us-east5-a ACCELERATOR=v5p-64 \
#   WORKDIR=gs://my-bucket/tarflow/in64_cond DATA_DIR=gs://my-bucket/tensorflow_datasets \
#   CONFIG=configs/imagenet64_cond.py launch/tpu_vm.sh all
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

# ------------------------------------------------------------------ settings (environment)
TPU_NAME="${TPU_NAME:-tarflow}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-}"                      # empty: gcloud's default project
ACCELERATOR="${ACCELERATOR:-v5p-64}"        # v5p-64 = 32 chips / 8 hosts; v4-64 = 32 chips / 8 hosts
case "${ACCELERATOR}" in                    # TPU VM software version per generation
  v5p-*) DEFAULT_VERSION="v2-alpha-tpuv5" ;;
  v5litepod-*) DEFAULT_VERSION="v2-alpha-tpuv5-lite" ;;
  v6e-*) DEFAULT_VERSION="v2-alpha-tpuv6e" ;;
  *) DEFAULT_VERSION="tpu-ubuntu2204-base" ;;
esac
TPU_VERSION="${TPU_VERSION:-${DEFAULT_VERSION}}"
SPOT="${SPOT:-0}"                           # 1: --spot (preemptible; training resumes from WORKDIR)
CONFIG="${CONFIG:-configs/imagenet64_cond.py}"
WORKDIR="${WORKDIR:-}"                      # gs://BUCKET/PATH (required for run/logs/all)
DATA_DIR="${DATA_DIR:-}"                    # gs://BUCKET/tensorflow_datasets (TFDS configs)
MODE="${MODE:-train}"                       # train | eval | sample
EXTRA_ARGS="${EXTRA_ARGS:-}"                # e.g. "--config.model.remat=True --config.batch_size=512"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"    # the package needs Python >= 3.11
JAX_SPEC="${JAX_SPEC:-jax[tpu]>=0.10.2}"
REMOTE_DIR="${REMOTE_DIR:-tarflow_jax}"     # relative to each worker's home directory
VENV="${VENV:-tarflow-venv}"                # relative to each worker's home directory
LOG_FILE="${LOG_FILE:-tarflow_run.log}"     # on each worker, in the home directory
WORKER="${WORKER:-0}"                       # which worker `logs` tails (process 0 logs metrics)

usage() {
  cat <<EOF
Usage: [VAR=value ...] launch/tpu_vm.sh COMMAND

Commands:
  create   create the TPU VM slice \${TPU_NAME} (\${ACCELERATOR}, \${TPU_VERSION}) in \${ZONE}
  copy     copy this repository to ~/\${REMOTE_DIR} on every worker
  install  make a Python \${PYTHON_VERSION} venv ~/\${VENV} on every worker; pip install -e . "\${JAX_SPEC}"
  run      start python -m tarflow_jax.main --jax_distributed on every worker (in the background)
  logs     tail -f the log of worker \${WORKER}
  stop     stop the run on every worker (the process started by 'run', by its pid file)
  delete   delete the slice
  all      create, copy, install, run, logs

Settings (environment, current value):
  TPU_NAME=${TPU_NAME} ZONE=${ZONE} PROJECT=${PROJECT:-<gcloud default>}
  ACCELERATOR=${ACCELERATOR} TPU_VERSION=${TPU_VERSION} SPOT=${SPOT}
  CONFIG=${CONFIG} MODE=${MODE}
  WORKDIR=${WORKDIR:-<unset: required, gs://...>}
  DATA_DIR=${DATA_DIR:-<unset: TFDS default>}
  EXTRA_ARGS=${EXTRA_ARGS:-<none>}
  PYTHON_VERSION=${PYTHON_VERSION} JAX_SPEC=${JAX_SPEC} REMOTE_DIR=~/${REMOTE_DIR} VENV=~/${VENV}
  LOG_FILE=~/${LOG_FILE} WORKER=${WORKER}
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 1; }

gcloud_tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with zone/project
  local sub="$1"; shift
  local args=(compute tpus tpu-vm "${sub}" "$@" --zone="${ZONE}")
  if [[ -n "${PROJECT}" ]]; then args+=(--project="${PROJECT}"); fi
  gcloud "${args[@]}"
}

on_workers() {  # on_workers WORKERS COMMAND: run a shell command over ssh on the workers
  gcloud_tpu ssh "${TPU_NAME}" --worker="$1" --command="$2"
}

require_workdir() {
  [[ -n "${WORKDIR}" ]] || die "set WORKDIR=gs://BUCKET/PATH (every host must reach it)"
  [[ "${WORKDIR}" == gs://* ]] || echo "tpu_vm.sh: warning: WORKDIR=${WORKDIR} is not on GCS;" \
    "a multi-host run needs a directory every host can read and write" >&2
}

cmd_create() {
  local args=("${TPU_NAME}" --accelerator-type="${ACCELERATOR}" --version="${TPU_VERSION}")
  if [[ "${SPOT}" == "1" ]]; then args+=(--spot); fi
  gcloud_tpu create "${args[@]}"
}

cmd_copy() {
  local tmp tarball
  tmp="$(mktemp -d)"
  tarball="${tmp}/tarflow_code.tgz"
  tar -czf "${tarball}" -C "${REPO_ROOT}" --exclude=.git --exclude=__pycache__ --exclude='*.pyc' \
    --exclude=.venv --exclude=venv --exclude='*.egg-info' --exclude=.pytest_cache \
    --exclude=.benchmarks --exclude=build --exclude='./workdir*' --exclude=./.whl --exclude=./logs .
  gcloud_tpu scp "${tarball}" "${TPU_NAME}:tarflow_code.tgz" --worker=all
  rm -rf "${tmp}"
  on_workers all "rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR} && \
tar -xzf ~/tarflow_code.tgz -C ~/${REMOTE_DIR} && rm ~/tarflow_code.tgz"
}

cmd_install() {
  # uv provides a Python ${PYTHON_VERSION} (the TPU VM images ship 3.10) and a fast pip.
  on_workers all "set -e; python3 -m pip install --user --quiet --upgrade uv; \
export PATH=\$HOME/.local/bin:\$PATH; \
uv venv --allow-existing --python ${PYTHON_VERSION} ~/${VENV}; \
cd ~/${REMOTE_DIR} && uv pip install --python ~/${VENV}/bin/python -e . '${JAX_SPEC}'; \
~/${VENV}/bin/python -c 'import jax, tarflow_jax; print(\"jax\", jax.__version__, \"ok\")'"
}

cmd_run() {
  require_workdir
  local args=(-m tarflow_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}" "--mode=${MODE}"
              --jax_distributed)
  if [[ -n "${DATA_DIR}" ]]; then args+=("--config.dataset.data_dir=${DATA_DIR}"); fi
  local extra=()
  if [[ -n "${EXTRA_ARGS}" ]]; then read -r -a extra <<< "${EXTRA_ARGS}"; args+=("${extra[@]}"); fi
  local quoted
  quoted="$(printf '%q ' "${args[@]}")"
  # One process per host; jax.distributed.initialize() finds the coordinator on TPU VMs.
  # setsid+nohup: the run survives the ssh session; its pid goes to ~/tarflow_run.pid.
  on_workers all "cd ~/${REMOTE_DIR} && \
if [ -f ~/tarflow_run.pid ] && kill -0 \$(cat ~/tarflow_run.pid) 2>/dev/null; then \
echo 'a run is already active on this worker (launch/tpu_vm.sh stop)'; exit 1; fi; \
TARFLOW_DISTRIBUTED=1 setsid nohup ~/${VENV}/bin/python ${quoted} > ~/${LOG_FILE} 2>&1 < /dev/null & \
echo \$! > ~/tarflow_run.pid; echo started pid \$(cat ~/tarflow_run.pid) on \$(hostname)"
  echo "tpu_vm.sh: started ${MODE} of ${CONFIG} on ${TPU_NAME}; workdir ${WORKDIR}"
}

cmd_logs() {
  on_workers "${WORKER}" "tail -n 200 -f ~/${LOG_FILE}"
}

cmd_stop() {
  on_workers all "if [ -f ~/tarflow_run.pid ]; then kill \$(cat ~/tarflow_run.pid) 2>/dev/null || true; \
rm -f ~/tarflow_run.pid; echo stopped on \$(hostname); fi"
}

cmd_delete() {
  gcloud_tpu delete "${TPU_NAME}" --quiet
}

main() {
  [[ $# -eq 1 ]] || { usage; exit 2; }
  case "$1" in
    create) cmd_create ;;
    copy) cmd_copy ;;
    install) cmd_install ;;
    run) cmd_run ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    all) require_workdir; cmd_create; cmd_copy; cmd_install; cmd_run; cmd_logs ;;
    -h|--help|help) usage ;;
    *) usage; exit 2 ;;
  esac
}

main "$@"
