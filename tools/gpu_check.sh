#!/usr/bin/env bash
# The GPU checks, in one run (device machine or any CUDA machine): results under $OUT.
#   1. `diffo matrix --devices cpu,cuda`: streams encoded on each device decode on every device to identical
#      symbols (format 2's coder); largest pixel difference between devices
#   2. the CUDA test of tests/test_matrix.py (CPU <-> GPU) and the golden streams
#   3. `diffo bench --parts sd,coders,osdiff`: the paper-scale models (SD 2.1 size, random weights, fp16): decode time
#      and peak GPU memory; the two entropy coders side by side
# Wheels the machine lacks may be carried in .whl/ (see /work/.library/device/README.md).
set -uo pipefail
OUT=${OUT:-out/gpu}
DEVICES=${DEVICES:-cpu,cuda}
BENCH_PARTS=${BENCH_PARTS:-sd,coders,osdiff}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import platform, torch
print(platform.platform(), "python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY
status=0
timeout 240 python3 -m diffo matrix --devices "$DEVICES" --out "$OUT/matrix_devices.json" 2>&1 | tail -20 || status=1
# The CUDA test first: on the H200 (2026-11-29) the whole three-file step ran past 240 s before reaching it.
timeout 300 python3 -m pytest -q -p no:cacheprovider "tests/test_matrix.py::test_cpu_and_gpu_decode_each_others_streams" \
    tests/test_golden.py 2>&1 | tee "$OUT/pytest.log" | tail -15 || status=1
timeout 400 python3 -m diffo bench --parts "$BENCH_PARTS" --sd --repeats 5 --out "$OUT/bench_gpu.json" 2>&1 | tail -20 || status=1
exit $status
