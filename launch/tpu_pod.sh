#!/usr/bin/env bash
# Runs the trainer on every worker of a Cloud TPU VM pod slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- --config configs/clip_pretrain.py:rn50_cc3m \
#       --workdir gs://BUCKET/runs/rn50 --config.data.path=gs://BUCKET/cc3m/train-*.array_record
#
# Every worker runs the same command; jax.distributed.initialize() detects the pod on its own
# (cleanclip_jax/distributed.py), each host reads its own share of the data, and process 0 logs.
# The workdir must be on storage every host sees (a gs:// bucket), since checkpoints are written
# by all hosts together. REPO_DIR (default ~/cleanclip_jax) is where the code lives on the
# workers; sync it first, e.g. with `gcloud compute tpus tpu-vm scp --worker=all`.
# Rerunning the same command resumes from the newest checkpoint (e.g. after a preemption).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- TRAINER_ARGS..." >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT_FLAG=()
if [[ $1 != "--" ]]; then PROJECT_FLAG=(--project "$1"); shift; fi
[[ ${1:-} == "--" ]] && shift
REPO_DIR=${REPO_DIR:-'~/cleanclip_jax'}

# Quote every trainer argument once for the remote shell.
TRAINER_ARGS=$(printf ' %q' "$@")
REMOTE="cd ${REPO_DIR} && . .venv/bin/activate && python -m cleanclip_jax.train${TRAINER_ARGS}"

exec gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" "${PROJECT_FLAG[@]}" \
  --worker=all --command "${REMOTE}"
