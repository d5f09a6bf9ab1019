#!/usr/bin/env bash
# A Cloud TPU pod slice (several TPU VM workers): the same command on every worker through
# `gcloud compute tpus tpu-vm ssh --worker=all`. The experiment scripts call
# maybe_initialize_distributed(); on a TPU VM slice this script sets JAX_COORDINATOR_ADDRESS to
# worker 0's internal address, so it calls jax.distributed.initialize(), which takes the
# process count and each worker's id from the TPU VM metadata.
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a scripts/tpu_pod.sh install GIT_URL     # clone + .venv + alignshift[tpu]
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a scripts/tpu_pod.sh doctor                # every worker joins; devices
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a scripts/tpu_pod.sh run CONFIG OUT [dotted.overrides ...]
#
# Environment: TPU_NAME, ZONE (required), PROJECT (default: gcloud's), REPO_DIR on the workers
# (default alignshift, relative to the home directory), PORT (coordinator port, default 8476),
# PY (the workers' Python >= 3.11 that makes the venv, default python3.11).
# OUT should be a bucket-backed or shared path if you want the checkpoints in one place.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-alignshift}
PORT=${PORT:-8476}
PY=${PY:-python3.11}
GCLOUD=(gcloud compute tpus tpu-vm)
PROJ=()
if [ -n "${PROJECT:-}" ]; then PROJ=(--project "$PROJECT"); fi

on_all_workers() {
    "${GCLOUD[@]}" ssh "$TPU_NAME" --zone "$ZONE" "${PROJ[@]}" --worker=all --command "$1"
}

coordinator() {
    local ip
    ip=$("${GCLOUD[@]}" describe "$TPU_NAME" --zone "$ZONE" "${PROJ[@]}" \
        --format='value(networkEndpoints[0].ipAddress)')
    echo "${ip}:${PORT}"
}

quote() { printf '%q ' "$@"; }

cmd=${1:-}
shift || true
case "$cmd" in
    install)
        url=${1:?usage: tpu_pod.sh install GIT_URL}
        on_all_workers "set -e; [ -d $(quote "$REPO_DIR") ] || git clone $(quote "$url") $(quote "$REPO_DIR");
            cd $(quote "$REPO_DIR") && $(quote "$PY") -m venv .venv && .venv/bin/pip install -q --upgrade pip &&
            .venv/bin/pip install -q -e '.[tpu]'"
        ;;
    doctor)
        on_all_workers "cd $(quote "$REPO_DIR") && export JAX_COORDINATOR_ADDRESS=$(coordinator) &&
            .venv/bin/python -m alignshift.doctor --distributed --require tpu"
        ;;
    run)
        [ $# -ge 2 ] || { echo "usage: tpu_pod.sh run CONFIG OUT [dotted.overrides ...]" >&2; exit 2; }
        args=$(quote --config "$1" --out "$2" "${@:3}")
        on_all_workers "cd $(quote "$REPO_DIR") && export JAX_COORDINATOR_ADDRESS=$(coordinator) &&
            .venv/bin/python experiments/preference_hf.py $args"
        ;;
    *)
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
