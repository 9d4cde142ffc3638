#!/usr/bin/env bash
# Installs the detection and segmentation frameworks that tests/test_frameworks.py builds real models with:
# detectron2, mmcv (with its compiled ops), mmengine, mmdet 3.x and mmsegmentation 1.x. The package index has no
# detectron2 and no mmcv with compiled ops for this torch, so both come from wheels built for this stack, in
# ../shared/wheels beside the checkout or in $DAT_WHEELS_DIR (its README.md says how they were built). Without that
# folder this does nothing and those tests skip. Idempotent: a machine where all of them import is left as it is.
# A failed install exits non-zero (the tests would then fail rather than skip, as the wheels are there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${DAT_WHEELS_DIR:-../shared/wheels}
# the compiled parts (mmcv._ext, detectron2._C) and opencv, which needs libGL and glib from the system
IMPORT_CHECK="import cv2, mmcv._ext, detectron2._C, mmengine, mmdet, mmseg"

if [ ! -d "$WHEELS" ]; then
  echo "== no framework wheels at $WHEELS: the detectron2/mmdet/mmseg tests will skip"
  exit 0
fi
if "$PY" -c "$IMPORT_CHECK" 2>/dev/null; then
  exit 0
fi

missing_system_packages=()
for package in libgl1 libglib2.0-0; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing_system_packages+=("$package")
done
if [ ${#missing_system_packages[@]} -gt 0 ]; then
  echo "== installing ${missing_system_packages[*]} (opencv's system libraries)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_system_packages[@]}" >/dev/null
fi

echo "== installing detectron2, mmcv, mmengine, mmdet and mmsegmentation from $WHEELS and the package index"
# the frameworks must not move the stack they were built for: pin what is installed now
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -c "from importlib.metadata import version
for name in ('torch', 'torchvision', 'numpy', 'timm'): print(f'{name}=={version(name)}')" >"$constraints"
# mmdet 3.3.0 needs mmcv < 2.2.0 (unpinned, pip picks the 2.2.0 source release, which does not build); mmengine is
# the release the tests were written against; mmseg.utils imports ftfy and regex, which mmsegmentation lists only
# as extras
"$PY" -m pip install --disable-pip-version-check -q -c "$constraints" --find-links "$WHEELS" \
  detectron2==0.6 mmcv==2.1.0 mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 ftfy regex 2>&1 |
  { grep -vE "Running pip as the 'root' user|is ignored: it is neither a file nor a directory" || true; }
"$PY" -c "$IMPORT_CHECK" || { echo "the detection/segmentation frameworks failed to install from $WHEELS" >&2; exit 1; }
