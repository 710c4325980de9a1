#!/usr/bin/env bash
# Runs the trainer on every worker of a Cloud TPU VM pod slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- --config configs/clip_pretrain.py:rn50_cc3m \
#       --workdir /gcs/BUCKET/runs/rn50 --config.data.source=array_record \
#       --config.data.path='/gcs/BUCKET/cc3m/train-*.array_record'
#
# Every worker runs the same command; jax.distributed.initialize() detects the pod on its own
# (cleanclip_jax/distributed.py), each host reads its own share of the data, and process 0 logs.
# The workdir must be on storage every host sees, since checkpoints are written by all hosts
# together: mount the bucket on every worker (e.g. `gcsfuse --rename-dir-limit=1000000 BUCKET
# /gcs/BUCKET`) and give mounted paths; the trainer reads and writes local paths only and refuses
# gs:// URLs with that advice. orbax commits a checkpoint by renaming its folder, which gcsfuse
# refuses on a flat bucket unless --rename-dir-limit allows it (a bucket with hierarchical
# namespace renames folders natively).
# The workers' .venv needs JAX's TPU build on top of the set-up (`pip install 'jax[tpu]==0.10.2'`);
# JAX_PLATFORMS=tpu makes a missing one an error rather than a silent CPU run. REPO_DIR (default ~/cleanclip_jax) is where the code lives on the
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
REMOTE="cd ${REPO_DIR} && . .venv/bin/activate && JAX_PLATFORMS=\${JAX_PLATFORMS:-tpu} python -m cleanclip_jax.train${TRAINER_ARGS}"

# ${a[@]+...}: an empty array is "unbound" under set -u in bash < 4.4.
exec gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} \
  --worker=all --command "${REMOTE}"
