#!/usr/bin/env bash
# One entry point that sets up a fresh machine and runs the main job or the tests.
#   bash scripts/dev.sh demo [args...]   -> python -m dat [args...]
#   bash scripts/dev.sh test [args...]   -> python -m pytest tests [args...]
# Set-up (idempotent): torch 2.14.1 / torchvision 0.29.1, this package in editable mode, its native extension
# built in place (C++ always, CUDA when nvcc is present; incremental; DAT_REQUIRE_EXT=1 makes a build failure
# fatal), its demo/test extras (scikit-learn for the offline digits demo; pytest and transformers for the tests), and
# timm's own model test suite from the source release of the installed timm (for tests/test_timm_suite.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
job=${1:-test}
shift || true

# pip's own exit status stands (pipefail): a failed install stops the script
quiet_pip() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v "Running pip as the 'root' user" || true; }; }

if ! "$PY" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')))" 2>/dev/null; then
  echo "== installing torch 2.14.1 and torchvision 0.29.1"
  quiet_pip torch==2.14.1 torchvision==0.29.1
fi

# dat.weights is mapped onto weights/ by the install, so it tells whether *this* checkout is the installed one; the
# extras' imports tell an install made before an extra was added to setup.py
if ! "$PY" -c "import dat.weights, sys, os; sys.exit(not dat.weights.__file__.startswith(os.path.join('$ROOT', 'weights')))" 2>/dev/null \
    || ! "$PY" -c "import sklearn, pytest, transformers" 2>/dev/null; then
  echo "== installing dat (editable) and its demo and test extras (scikit-learn, pytest, transformers)"
  # no extension here: the build below compiles it, the same way for both jobs
  DAT_BUILD_EXT=0 quiet_pip --no-build-isolation -e ".[test,demo]"
fi

# Both jobs build the same way into build/, so a command compiles only what changed since the last one (nothing,
# when no source, header or build setting did). ninja echoes each compiler command line: only its source file is
# shown; compiler warnings and errors are shown in full.
echo "== native extension dat._C (C++; CUDA too when nvcc is present): compiling what changed"
library_times() { stat -c %Y dat/_C*.so 2>/dev/null || true; }
before=$(library_times)
MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace 2>&1 \
  | sed -u -E 's/^(\[[0-9]+\/[0-9]+\]) .* -c ([^ ]+) .*/\1 compiling \2/' || true
if [ -n "$before" ] && [ "$before" = "$(library_times)" ]; then echo "   up to date"; fi
[ "${DAT_REQUIRE_EXT:-0}" != 1 ] || "$PY" -c "import dat._C" || { echo "native extension failed to build"; exit 1; }

TIMM_VERSION=$("$PY" -c "import timm; print(timm.__version__)")
export DAT_TIMM_TESTS="$ROOT/.cache/timm-$TIMM_VERSION/tests"
if [ ! -f "$DAT_TIMM_TESTS/test_models.py" ]; then
  echo "== fetching timm $TIMM_VERSION's own test suite"
  tmp=$(mktemp -d)
  if "$PY" -m pip download -q --no-deps --no-binary :all: "timm==$TIMM_VERSION" -d "$tmp" 2>/dev/null; then
    mkdir -p "$ROOT/.cache" && tar -xzf "$tmp"/timm-*.tar.gz -C "$ROOT/.cache" "timm-$TIMM_VERSION/tests"
  else
    echo "   (could not download it: tests/test_timm_suite.py will skip)"
  fi
  rm -rf "$tmp"
fi

# TBB for the emulated CUDA test tier (tests/kernel_targets.py runs the .cu kernels on the CPU through HIP-CPU)
if [ "$job" = test ] && [ ! -f /usr/include/tbb/tbb.h ] && [ ! -f /usr/include/oneapi/tbb.h ] && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  echo "== installing TBB (libtbb-dev) for the emulated CUDA tests"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtbb-dev; } >/dev/null \
    || echo "   (could not install libtbb-dev: the emulated CUDA tests will skip)"
fi

# --- detection/segmentation frameworks for tests/test_frameworks.py (from ../shared/wheels where present) ---
[ "$job" != test ] || PYTHON="$PY" bash scripts/install_frameworks.sh
# ---

case "$job" in
  demo) exec "$PY" -m dat "$@" ;;
  test) exec "$PY" -m pytest tests "$@" ;;
  *) echo "usage: bash scripts/dev.sh demo|test [args...]" >&2; exit 2 ;;
esac
