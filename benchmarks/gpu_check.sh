#!/usr/bin/env bash
# The device check for one GPU machine (one H200, 16 cores, no internet): under 8 minutes, one
# JSON per part under $OUT (default ./gpu_check_out). Each part has its own timeout, capped by
# what is left of the whole budget, and the next part runs whatever the previous one did.
#
#   bash benchmarks/gpu_wheels.sh          # here, online: fills .whl/ (wheels + digits shards)
#   bash benchmarks/gpu_check.sh           # there, from the repository root, .whl/ beside it
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # here, on CPU: each part's smallest variant
#
# Parts (in this order, the headline numbers first):
#   setup        install .whl/ (pip --no-index --no-deps), vlp on PYTHONPATH, unpack digits
#   gpu_step     benchmarks/gpu_step.py: vlp eager + compiled vs open_clip eager + compiled,
#                ViT-B/16 CLIP, bf16, B = 256, MFU (models/flops)
#   loss_memory  benchmarks/loss_memory.py --device cuda at N = 16,384 and 65,536
#   loader       benchmarks/loader.py at 16 workers, 256 px, against gpu_step's step rate
#   pytest_cuda  pytest -m cuda (tests/test_cuda.py, and any other test marked cuda)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_check_out}
DRY=${GPU_CHECK_DRY:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-465}   # 7 min 45 s: the 8-minute target with a margin
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)
WORK=$(mktemp -d)

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# record PART RC SECONDS LOG: $OUT/PART.json with the exit status, whether it timed out, the
# last JSON line the part printed (its result), and the log's tail (a traceback, if any).
record() {
  "$PYTHON" - "$@" <<'EOF'
import json, sys
part, rc, seconds, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
lines = open(log, errors="replace").read().splitlines()
result = None
for line in reversed(lines):
    if line.startswith("{"):
        try:
            result = json.loads(line)
            break
        except ValueError:
            pass
out = {"part": part, "rc": rc, "timed_out": rc in (124, 137), "seconds": seconds, "result": result,
       "log_tail": lines[-60:]}
json.dump(out, open(f"{sys.argv[5]}/{part}.json", "w"), indent=1)
print(f"[gpu_check] {part}: rc {rc} in {seconds:.0f} s" + (" (timed out)" if out["timed_out"] else ""))
EOF
}

# part NAME TIMEOUT_S COMMAND...: run it under min(TIMEOUT_S, what is left), log to $OUT/NAME.log
part() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 10 ]; then
    echo "budget spent before this part" > "$OUT/$name.log"
    record "$name" 124 0 "$OUT/$name.log" "$OUT"
    return
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  local begin; begin=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  record "$name" "$rc" "$(( $(date +%s) - begin ))" "$OUT/$name.log" "$OUT"
}

setup() {
  set -e
  if [ "$DRY" != 1 ]; then
    if [ -d .whl ]; then
      local wanted=(deepspeed open_clip_torch webdataset monai pydantic pydantic_core hjson braceexpand ftfy wcwidth
                    annotated-types typing-inspection py-cpuinfo einops msgpack psutil ninja pytest pluggy iniconfig
                    pytest-timeout)
      "$PYTHON" -c "import matplotlib" 2>/dev/null || wanted+=(matplotlib kiwisolver contourpy fonttools cycler pyparsing)
      # One at a time: a package already installed, or without a wheel for this Python, is not fatal.
      for package in "${wanted[@]}"; do
        "$PYTHON" -m pip install -q --no-deps --no-index --find-links .whl "$package" \
          || echo "setup: $package not installed from .whl"
      done
    else
      echo "setup: no .whl/ beside the repository (run benchmarks/gpu_wheels.sh where there is internet)"
    fi
  fi
  # vlp's packages are the repository's folders (vlp.core = core/ ...): a link named vlp on the path.
  mkdir -p "$WORK/path"
  ln -sfn "$ROOT" "$WORK/path/vlp"
  if [ -f .whl/digits.tar.gz ]; then
    tar -xzf .whl/digits.tar.gz -C "$WORK"
  fi
  "$PYTHON" - <<'EOF'
import json, platform, torch
import vlp.models.flops, vlp.train.trainer  # noqa: F401  (the install is complete enough to train)
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))
EOF
}

export PYTHONPATH="$WORK/path${PYTHONPATH:+:$PYTHONPATH}"
[ -f .whl/digits.tar.gz ] && export VLP_DIGITS_DIR="$WORK/digits"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

part setup 60 bash -c "$(declare -f setup); ROOT='$ROOT' WORK='$WORK' DRY='$DRY' PYTHON='$PYTHON' setup"

if [ "$DRY" = 1 ]; then
  part gpu_step 200 "$PYTHON" benchmarks/gpu_step.py --device cpu --quick
  part loss_memory 60 "$PYTHON" benchmarks/loss_memory.py --device cpu --sizes 1024 --reps 1 --plot "$OUT/loss_memory.png"
  part loader 90 "$PYTHON" benchmarks/loader.py --quick --workers 2 --sizes 64 --plain-batches 0
  part pytest_cuda 60 "$PYTHON" -m pytest -q -rs -m cuda tests/test_cuda.py -p no:cacheprovider
else
  # 4 children (~20 s eager, ~60-90 s compiled each, ViT-B/16 forward + backward at B = 256).
  part gpu_step 200 "$PYTHON" benchmarks/gpu_step.py --device cuda --batch 256 --steps 20 --child-timeout 110
  part loss_memory 40 "$PYTHON" benchmarks/loss_memory.py --device cuda --sizes 16384,65536 --reps 3 \
    --open-clip-max-gb 40 --plot "$OUT/loss_memory_cuda.png"
  part loader 60 "$PYTHON" benchmarks/loader.py --workers 16 --sizes 256 --device cuda --decode cpu,gpu
  part pytest_cuda 150 "$PYTHON" -m pytest -q -rs -m cuda tests/ --continue-on-collection-errors -p no:cacheprovider \
    --junitxml "$OUT/pytest_cuda.xml"
fi

# The loader against the step: can 16 workers feed the rate vlp's step runs at?
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
def result(part):
    try:
        return json.load(open(f"{out}/{part}.json")).get("result") or {}
    except (OSError, ValueError):
        return {}
step = result("gpu_step").get("results", {})
step_rate = max((row.get("samples_per_s", 0) for mode, row in step.items() if mode.startswith("vlp")), default=None)
loader = result("loader")
rates = [value for key, value in loader.items() if "samples_per_s" in key and isinstance(value, (int, float))]
summary = {"step_samples_per_s": step_rate, "loader_result_keys": sorted(loader),
           "loader_samples_per_s": max(rates) if rates else None}
if step_rate and rates:
    summary["loader_feeds_the_step"] = max(rates) >= step_rate
json.dump(summary, open(f"{out}/loader_vs_step.json", "w"), indent=1)
print(f"[gpu_check] loader vs step: {summary}")
EOF
echo "[gpu_check] done in $(( $(date +%s) - START )) s; results in $OUT"
rm -rf "$WORK"
