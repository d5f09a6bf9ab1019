#!/usr/bin/env bash
# One host, all of its GPUs (or one TPU VM), ONE process: JAX sees every local accelerator, the
# config's mesh spans them, and no jax.distributed set-up is needed (the experiment scripts call
# maybe_initialize_distributed(), which finds no multi-process launcher here and does nothing).
#
#   scripts/launch_single_host.sh CONFIG OUT [dotted.overrides ...]
#   e.g. scripts/launch_single_host.sh experiments/configs/iw_dpo_safe_rlhf_llama3_8b.yaml \
#            results/iw_dpo_safe_rlhf model.hf_path=/models/Llama-3.1-8B-Instruct \
#            data.dataset_source=/data/PKU-SafeRLHF mesh.data=1 mesh.fsdp=-1
#
# Environment: PYTHON (default .venv/bin/python), SCRIPT (default experiments/preference_hf.py),
# REQUIRE (backend the doctor must find: gpu (default), tpu or cpu), and anything JAX reads, e.g.
# CUDA_VISIBLE_DEVICES=0,1,2,3 to use 4 of the host's GPUs, XLA_PYTHON_CLIENT_MEM_FRACTION
# (JAX preallocates 75% of each GPU by default).
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
CONFIG=$1 OUT=$2
shift 2
PYTHON=${PYTHON:-.venv/bin/python}
SCRIPT=${SCRIPT:-experiments/preference_hf.py}
cd "$(dirname "$0")/.."

# 1. what JAX sees (versions, devices, memory, cuDNN attention); stops here without the accelerator
"$PYTHON" -m alignshift.doctor --require "${REQUIRE:-gpu}"
# 2. the plan: parameters, per-device memory, sharding (no weights read)
"$PYTHON" "$SCRIPT" --config "$CONFIG" --dry-run "$@"
# 3. the run
exec "$PYTHON" "$SCRIPT" --config "$CONFIG" --out "$OUT" "$@"
