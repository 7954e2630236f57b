#!/usr/bin/env bash
# Fill .whl/ (gitignored) with what benchmarks/gpu_check.sh installs on a GPU machine that has
# python3, torch, timm, transformers, pandas and pyarrow but no internet and none of:
# deepspeed, open_clip, webdataset, monai, pydantic, hjson, braceexpand, pytest (maybe), and no
# scikit-learn (the tests' digits shards are therefore built here, into .whl/digits/).
#
#   bash benchmarks/gpu_wheels.sh                       # run here, in the project's venv, online
#   PY_VERSIONS=3.12 MPL_PY_VERSIONS=3.12 bash benchmarks/gpu_wheels.sh   # its python, when known
#
# Versions are the ones this venv runs (the tested set; pip's "Location ... ignored" warnings
# about local indexes are harmless). Pure-Python wheels once; compiled ones
# (pydantic-core, msgpack) for each of PY_VERSIONS, matplotlib's stack (the run's loss plot; the
# GPU machine may have it already) for each of MPL_PY_VERSIONS, manylinux x86_64. deepspeed ships only an sdist: a pure-Python wheel is built
# here (`pip wheel --no-deps --no-build-isolation`, DS_BUILD_OPS=0: no CUDA op is compiled; the
# engine uses torch's AdamW, so none is needed). Prints the total size; fails above 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.whl}
PY_VERSIONS=${PY_VERSIONS:-"3.10 3.11 3.12 3.13"}
# matplotlib's stack is ~17 MiB per Python: only the likeliest ones by default (MPL_PY_VERSIONS="" skips it).
MPL_PY_VERSIONS=${MPL_PY_VERSIONS-"3.11 3.12"}
LIMIT_MIB=${LIMIT_MIB:-60}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"

version() { "$PYTHON" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
pin() { local v; v=$(version "$1"); [ -n "$v" ] || { echo "gpu_wheels: $1 is not installed in $PYTHON's env" >&2; exit 2; }; echo "$1${2:-==}$v"; }

# Pure-Python (py3-none-any) packages and the pure-Python dependencies the GPU machine lacks.
PURE=(open_clip_torch webdataset monai pydantic hjson braceexpand ftfy wcwidth annotated-types
      typing-inspection py-cpuinfo einops pytest pluggy iniconfig pytest-timeout)
# Compiled, one wheel per Python version (psutil and ninja are abi3 / py3-none: one wheel does).
ABI3=(psutil ninja)
PER_PYTHON=(pydantic_core msgpack)
MPL_STACK=(matplotlib kiwisolver contourpy fonttools)
MPL_PURE=(cycler pyparsing)

pins=(); for p in "${PURE[@]}" "${ABI3[@]}"; do pins+=("$(pin "$p")"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" "${pins[@]}"

download_for() {  # download_for PYTHON_VERSION PACKAGE...: compiled wheels for that CPython
  local py=$1; shift
  # At most this venv's version: an older Python gets the newest release that still supports it.
  local pins=(); for p in "$@"; do pins+=("$(pin "$p" "<=")"); done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" --python-version "$py" \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 "${pins[@]}"
}
for py in $PY_VERSIONS; do download_for "$py" "${PER_PYTHON[@]}"; done
if [ -n "$MPL_PY_VERSIONS" ]; then
  pins=(); for p in "${MPL_PURE[@]}"; do pins+=("$(pin "$p")"); done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" "${pins[@]}"
  for py in $MPL_PY_VERSIONS; do download_for "$py" "${MPL_STACK[@]}"; done
fi

# deepspeed: sdist only on PyPI; a pure-Python wheel built against this venv's torch.
if ! ls "$OUT"/deepspeed-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$(pin deepspeed)"
fi

# The tests' digits shards (conftest builds them with scikit-learn, which the GPU machine lacks);
# tests/test_cuda.py reads them from VLP_DIGITS_DIR, which gpu_check.sh points here.
# Shipped as one tar.gz (the shards' 512-byte tar padding compresses ~15 MiB to ~1).
if [ ! -f "$OUT/digits.tar.gz" ]; then
  scratch=$(mktemp -d)
  "$PYTHON" -c "from vlp.data_pipelines.sources import build; build('digits', '$scratch/digits', shard_size=400)"
  tar -czf "$OUT/digits.tar.gz" -C "$scratch" digits
  rm -rf "$scratch"
fi

ls -la "$OUT"
total=$(du -sb "$OUT" | cut -f1)
printf 'gpu_wheels: %s files, %.1f MiB in %s (limit %s MiB)\n' "$(find "$OUT" -type f | wc -l)" \
  "$(echo "$total / 1048576" | bc -l)" "$OUT" "$LIMIT_MIB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu_wheels: over ${LIMIT_MIB} MiB: set PY_VERSIONS to the GPU machine's python only, or MPL=0" >&2
  exit 1
fi
