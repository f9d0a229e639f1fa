#!/usr/bin/env bash
# One-shot GPU check of hf_fg2u on a lent, offline GPU machine: find a Python whose torch sees CUDA, make sure
# the library's dependencies import (installing missing ones only from a local wheel folder or a configured
# local index), make hf_fg2u importable, then run scripts/gpu_check.py (~7 minutes on an H100).
#
#   OUT=/some/dir bash scripts/gpu_check.sh [gpu_check.py flags]     # OUT defaults to ./gpu_check_out
#
# Writes $OUT/gpu_check.{json,md} (rewritten after every cell) and $OUT/gpu_check.log (all output).
# Optional: PYTHON=/path/to/python picks the interpreter; WHEELS=/dir is a folder of wheels to install from.
set -euo pipefail

cd "$(dirname "$0")/.."  # the repository root
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
export OUT

# Offline everywhere; unbuffered output so the log keeps up; fewer fragmentation OOMs in long unrolls.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# A throwaway machine: let pip install into a system ("externally managed") interpreter.
export PIP_BREAK_SYSTEM_PACKAGES=1

# The modules hf_fg2u imports, as import-name:pip-name.
REQUIRED="transformers:transformers peft:peft datasets:datasets accelerate:accelerate safetensors:safetensors"
REQUIRED+=" tqdm:tqdm yaml:pyyaml numpy:numpy"

# The first interpreter whose torch imports and sees a CUDA device; prints its path, or nothing.
find_python() {
    local candidate
    for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
        [[ -n "$candidate" ]] && command -v "$candidate" > /dev/null || continue
        if "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null; then
            command -v "$candidate"
            return
        fi
        echo "skipping $candidate: torch missing or without a CUDA device" >&2
    done
}

# The pip names of the REQUIRED modules that $PY cannot import (space-separated, empty when none).
missing_packages() {
    local pair missing=""
    for pair in $REQUIRED; do
        "$PY" -c "import ${pair%%:*}" 2> /dev/null || missing+=" ${pair##*:}"
    done
    echo "$missing"
}

# Install missing packages from local sources only: $WHEELS with --no-index, else the index pip is configured
# with (a local mirror, if any; without network this fails within seconds). Failures are reported later.
install_missing() {
    # shellcheck disable=SC2086  # $1 is a list of names
    if [[ -n "${WHEELS:-}" ]]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" $1 || true
    else
        "$PY" -m pip install -q --timeout 5 --retries 0 $1 || true
    fi
}

main() {
    echo "== GPU"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
    else
        echo "nvidia-smi not found"
    fi

    # 1. Python with CUDA torch.
    PY="$(find_python)"
    if [[ -z "$PY" ]]; then
        echo "MISSING: no Python with a CUDA-enabled torch (tried \$PYTHON, .venv/bin/python, python3, python)."
        exit 2
    fi
    echo "== Python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"

    # 2. The dependencies.
    local missing
    missing="$(missing_packages)"
    if [[ -n "$missing" ]]; then
        echo "== installing missing packages:$missing"
        install_missing "$missing"
        missing="$(missing_packages)"
    fi
    if [[ -n "$missing" ]]; then
        echo "MISSING: $PY cannot import these packages and no local source provided them:$missing"
        echo "Provide wheels (WHEELS=/dir/of/wheels bash scripts/gpu_check.sh) or a Python that has them."
        exit 2
    fi
    "$PY" -c 'import transformers, peft; print("== transformers", transformers.__version__, "| peft", peft.__version__)'

    # 3. hf_fg2u itself: an editable install without dependencies; where pip cannot (no setuptools offline),
    #    the repository root on PYTHONPATH does the same for this run.
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e .; then
        echo "pip install -e . failed; using PYTHONPATH=$PWD instead"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PY" -c 'import hf_fg2u.hypergrad, hf_fg2u.lm.losses; print("== hf_fg2u from", hf_fg2u.__file__)'

    # 4. The measurements. gpu_check.py keeps to its own --budget (420 s by default); the timeout is a
    #    backstop inside the runner's 10-minute limit. The JSON and table are rewritten after every cell.
    local status=0
    timeout -k 15 540 "$PY" scripts/gpu_check.py --out-dir "$OUT" "$@" || status=$?
    echo "== gpu_check.py exit status $status; in $OUT: $(ls "$OUT" | tr '\n' ' ')"

    # 5. bf16 on the GPU's own kernels: every method's hypergradient of a bf16 model against float64
    #    (docs/low_precision.md has the CPU's; ~1 minute).
    local precision=0
    timeout -k 15 240 "$PY" scripts/check_low_precision.py --device cuda --out "$OUT/low_precision_cuda.md" \
        || precision=$?
    echo "== bf16 against float64 on cuda: exit status $precision, table in $OUT/low_precision_cuda.md"
    (( status == 0 )) && status=$precision

    # 6. With two GPUs or more: the multi-rank agreement scenarios of tests/helpers/agreement_run.py on 2 NCCL ranks
    #    (empty direction share, auto, non-finite share, refused lock, failed save, different settings;
    #    ~1 minute). Each hung or crashed before the ranks agreed by construction; the timeout turns a hang into
    #    a failure.
    if (( $("$PY" -c 'import torch; print(torch.cuda.device_count())') >= 2 )); then
        local ranks=0
        timeout -k 15 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
            tests/helpers/agreement_run.py \
            --cuda --output "$OUT/agreement" --result "$OUT/agreement.json" || ranks=$?
        echo "== multi-rank agreement exit status $ranks (0: every scenario ended alike on every rank, see" \
            "$OUT/agreement.json)"
        (( status == 0 )) && status=$ranks
    fi
    return "$status"
}

# Everything is printed and kept in the log; with pipefail the script's exit status is main's.
main "$@" 2>&1 | tee "$OUT/gpu_check.log"
