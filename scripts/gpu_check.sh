#!/usr/bin/env bash
# The CUDA path on one GPU machine, in one go (issue 19): build the pinned mamba-ssm and
# causal-conv1d for this GPU's architecture only, run the `gpu` tests, then
# scripts/gpu_check.py (values and every gradient across the cuda / torch / cpu backends and
# mamba_ssm.Mamba with the same weights, SAM steps of a 3D U-Mamba-Enc under bf16 and
# fp16 + GradScaler, the kernels' limits, scan timings against the torch backend).
#
# Made for a machine with torch (CUDA build), nvcc and transformers but no network and no
# mamba-ssm: what it lacks comes in .gpu/ (see benchmarks/README.md, "CUDA path"):
#   .gpu/sdist/  mamba_ssm-<pin>.tar.gz, causal_conv1d-<pin>.tar.gz (the Dockerfile's pins)
#   .gpu/whl/    pure-Python / cp312 wheels that `import uumamba.nn` needs (pydantic & co.)
# Run from the checkout:  bash scripts/gpu_check.sh     (logs under $OUT, else /tmp/gpu_check)
# A rerun on a machine that kept the build skips it. Exit status: 0 all passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH  # carried wheels (ninja too)
O=${OUT:-/tmp/gpu_check}; S=/tmp/src; mkdir -p "$O" "$S"
MV=$(sed -n 's/^ARG MAMBA_SSM_VERSION=//p' Dockerfile); CV=$(sed -n 's/^ARG CAUSAL_CONV1D_VERSION=//p' Dockerfile)
M=$S/mamba_ssm-$MV; C=$S/causal_conv1d-$CV; status=0
echo "== machine"; nvidia-smi -L; nvcc --version | tail -1
python3 - <<'PY'
import torch
try:
    import transformers as t, transformers.generation as g
    tf = f"transformers {t.__version__} (GreedySearchDecoderOnlyOutput: {hasattr(g, 'GreedySearchDecoderOnlyOutput')})"
except Exception as exc:
    tf = f"transformers not importable: {exc}"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "| capability %d.%d" % torch.cuda.get_device_capability(), "|", tf)
PY
echo "pins (Dockerfile): mamba-ssm $MV, causal-conv1d $CV"
[ -f .gpu/sdist/mamba_ssm-$MV.tar.gz ] && [ -f .gpu/sdist/causal_conv1d-$CV.tar.gz ] || { echo "missing sdists in .gpu/sdist for the pins"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1

echo "== build (this GPU's architecture only)"
ARCH=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! python3 -c "import selective_scan_cuda, causal_conv1d_cuda, mamba_ssm" 2>/dev/null; then
  for a in .gpu/sdist/mamba_ssm-$MV.tar.gz .gpu/sdist/causal_conv1d-$CV.tar.gz; do tar -xzf "$a" -C $S; done
  # upstream hard-codes -gencode lists (sm_53 ... sm_121); TORCH_CUDA_ARCH_LIST decides instead
  sed -i -E 's/cc_flag\.append\("(-gencode|arch=compute_[0-9a-z]+,code=sm_[0-9a-z]+)"\)/pass/' $M/setup.py $C/setup.py
  if grep -n 'arch=compute_' $M/setup.py $C/setup.py; then echo "unpatched -gencode flags"; exit 1; fi
  export TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)} MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
  t=$SECONDS
  for p in $C $M; do (cd $p && python3 -m pip install -v --no-build-isolation --no-deps --no-index . >"$O/build_${p##*/}.log" 2>&1; echo "${p##*/} rc=$?") & done
  wait; echo "build for sm_${ARCH/./}: $((SECONDS - t)) s"
fi
python3 -c "import selective_scan_cuda, causal_conv1d_cuda, mamba_ssm as m, causal_conv1d as c; print('mamba_ssm', m.__version__, 'causal_conv1d', c.__version__)" \
  || { tail -n 25 "$O"/build_*.log 2>/dev/null; exit 1; }

echo "== gpu tests (fail, not skip, when mamba-ssm is installed but unusable)"
tests="tests/test_mamba.py tests/test_cuda_path.py"
if python3 -c "import numba" 2>/dev/null; then tests="tests/test_scan.py $tests"; else echo "numba absent: tests/test_scan.py (imports the cpu backend) not run"; fi
python3 -m pytest -q -o addopts= -m gpu -p no:cacheprovider $tests 2>&1 | tee "$O/pytest.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== scripts/gpu_check.py"
python3 scripts/gpu_check.py "$@" 2>&1 | tee "$O/check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check.sh: $([ $status -eq 0 ] && echo OK || echo FAIL)"
exit $status
