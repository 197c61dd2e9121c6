#!/usr/bin/env bash
# velocitune train on one node under torchrun, one process per GPU.
#   bash examples/torchrun_1node.sh CONFIG [NPROC] [--section.key=value ...]
# NPROC defaults to the number of GPUs nvidia-smi lists. The command always passes --resume: with no
# checkpoint in run.out_dir it starts the run, with one it continues bit-identically, so rerunning this
# script after a crash or a preemption is all a restart needs.
# torchrun is the one on PATH (an activated environment), else the repository's .venv/bin/torchrun (what
# `make setup` creates; the repository root is found from this script's own path), else an error.
set -euo pipefail
config=${1:?usage: bash examples/torchrun_1node.sh CONFIG [NPROC] [--section.key=value ...]}
shift
nproc=$(nvidia-smi -L 2>/dev/null | wc -l || true)
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then nproc=$1; shift; fi
if [[ ${nproc:-0} -lt 1 ]]; then
  echo "error: no GPU found; pass the number of processes: bash $0 $config NPROC" >&2
  exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if command -v torchrun >/dev/null 2>&1; then
  torchrun=$(command -v torchrun)
elif [[ -x $root/.venv/bin/torchrun ]]; then
  torchrun=$root/.venv/bin/torchrun
else
  echo "error: torchrun not found: it is not on PATH and $root/.venv/bin/torchrun does not exist; run \`make setup\`" \
       "in $root, or activate the environment velocitune is installed in" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}   # torchrun's default of 1 starves the data and eval paths
exec "$torchrun" --standalone --nproc_per_node="$nproc" -m velocitune train "$config" --resume "$@"
