#!/usr/bin/env bash
# Supported-version floors: a fresh venv with exactly the lowest versions setup.cfg's install_requires admits
# (torch, transformers, accelerate, safetensors; read from setup.cfg, so the floors and this check cannot drift
# apart), the test tools at their newest compatible releases, sema-hf itself without dependencies, then the
# callback tests (with the evaluation contract and the single-process preemption tests since issues 16 and 19).
# Measured here: 9 min 49 s wall on a 2-core machine loaded by other jobs (3 min 18 s of CPU; the
# tests themselves 54 s, the rest installing); idle, the installs should take about 2 minutes (ENVIRONMENT.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
PY=${PYTHON:-python}
TESTS=(
    tests/test_config.py tests/test_schedule.py tests/test_callback.py tests/test_resume.py
    tests/test_trainer_workflows.py tests/test_evaluation_contract.py tests/test_preemption.py
)

floor() {  # "torch>=2.13.0" in setup.cfg -> 2.13.0
    local found
    found=$(sed -n "s/^[[:space:]]*$1[[:space:]]*>=[[:space:]]*\([0-9][0-9.]*\).*/\1/p" setup.cfg | head -n 1)
    [ -n "$found" ] || { echo "floors.sh: no '$1>=' floor in setup.cfg install_requires" >&2; exit 1; }
    echo "$found"
}
declare -A FLOOR
for pkg in torch transformers accelerate safetensors; do FLOOR[$pkg]=$(floor "$pkg"); done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
pins=()
for pkg in torch transformers accelerate safetensors; do pins+=("$pkg==${FLOOR[$pkg]}"); done
# torch first, pinned: on these machines torch==<floor> must come from the local CPU build, never a CUDA download.
"$VPY" -m pip install -q "torch==${FLOOR[torch]}"
"$VPY" -m pip install -q "${pins[@]}" datasets pytest optuna
"$VPY" -m pip install -q --no-deps -e .
"$VPY" - "${pins[@]}" <<'PYEOF'
import sys
from importlib.metadata import version

pins = [pin.split("==") for pin in sys.argv[1:]]
wrong = [f"{name} {version(name)} (floor {want})" for name, want in pins if version(name).split("+")[0] != want]
if wrong:
    sys.exit(f"floors.sh: the resolver moved a floor: {wrong}")
print("floors:", " ".join(f"{name} {version(name)}" for name, _ in pins))
PYEOF
# Not the 2-rank resume tests: transformers 5.10.1's own multi-process CPU resume fails before SEMA runs
# (torch.load of the optimizer state with map_location "cpu:0": "don't know how to restore data location"); they run
# in the main suite on current releases.
"$VPY" -m pytest -q -p no:cacheprovider -m "not multiprocess" "${TESTS[@]}"
