#!/usr/bin/env bash
# The wheels a GPU machine without a package index needs to run benchmarks/gpu_check.sh, for CPython on x86-64 Linux:
#
#   bash benchmarks/device_wheels.sh [FOLDER] [PYTHON_VERSION]     (default: .whl in the checkout, 3.12)
#
# Such a machine (the workplace's lent H100 and H200 have Python 3.12 with torch, numpy, scipy, scikit-image,
# scikit-learn, pandas, matplotlib, seaborn, timm, einops, httpx, rich and pytest, and no package index) lacks nnU-Net
# and part of its dependencies. This fetches their wheels at the versions installed here, builds those PyPI has only
# as source (pure Python) and this package's own wheel, and recompresses the large wheels with LZMA: pip reads any
# compression Python's zipfile reads, and SimpleITK's 53 MB become 29 MB, so that the folder (about 44 MiB) fits the
# 64 MiB a device call may carry. It refuses a folder above 60 MiB. Takes about 2 minutes on 2 CPU cores. On the
# machine, from the checkout, with the folder carried:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl &&
#     GPU_CHECK_REPORT=$OUT/gpu_check.txt bash benchmarks/gpu_check.sh /tmp/gc
#
# This installs into the machine's own environment, so that nnU-Net's commands and this package's lie beside its
# python, where the tests look for them. Left out, as nothing that gpu_check.sh runs imports them: imagecodecs (28 MB,
# codecs of nnU-Net's TIFF reader) and batchgenerators' Python 2 helpers (future, unittest2).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
folder=$(realpath -m "${1:-$repo/.whl}")
python_version=${2:-3.12}
mkdir -p "$folder"
if compgen -G "$folder/*.whl" > /dev/null; then
  echo "$folder already holds wheels: remove them first (pip installs all of a folder's wheels, two versions clash)" >&2
  exit 1
fi
# nnU-Net and what it needs beyond the machine's packages (blosc2 imports pydantic), at the versions installed here
packages=(nnunetv2 acvl-utils batchgenerators batchgeneratorsv2 dynamic-network-architectures blosc2 SimpleITK
          connected-components-3d nibabel graphviz yacs ndindex pydantic pydantic-core annotated-types typing-inspection)
pinned=()
for p in "${packages[@]}"; do
  pinned+=("$p==$(python -c "import importlib.metadata as m; print(m.version('$p'))")")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
source_only=()
for p in "${pinned[@]}"; do
  if ! python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
      --implementation cp "${platforms[@]}" -d "$folder" "$p" 2> /dev/null; then
    source_only+=("$p")
  fi
done
# pure-Python packages published as source only (acvl-utils): built here, they install on any Python
if [ ${#source_only[@]} -gt 0 ]; then
  python -m pip wheel --quiet --no-deps -w "$folder" "${source_only[@]}"
fi
rm -rf "$repo/build"  # setuptools would pack stale modules left there by an earlier build
python -m pip wheel --quiet --no-deps -w "$folder" "$repo"
rm -rf "$repo/build"
# the same files, each entry compressed with LZMA instead of deflate (about 1.5 minutes for SimpleITK)
python - "$folder" <<'PY'
import os, sys, zipfile
for name in sorted(os.listdir(sys.argv[1])):
    path = os.path.join(sys.argv[1], name)
    if os.path.getsize(path) < 2 ** 20:
        continue
    with zipfile.ZipFile(path) as wheel, zipfile.ZipFile(path + ".lzma", "w", zipfile.ZIP_LZMA) as repacked:
        for entry in wheel.infolist():
            repacked.writestr(entry, wheel.read(entry), compress_type=zipfile.ZIP_LZMA)
    print(f"{name}: {os.path.getsize(path) / 2 ** 20:.1f} MiB -> {os.path.getsize(path + '.lzma') / 2 ** 20:.1f} MiB")
    os.replace(path + ".lzma", path)
PY
for f in "$folder"/*; do
  case $f in *-none-any.whl|*-cp${python_version/./}-*.whl|*-abi3-*.whl) ;;
    *) echo "$f is not a wheel for CPython $python_version" >&2; exit 1 ;; esac
done
ls -1 "$folder"
size=$(du -sm "$folder" | cut -f1)
echo "$(ls "$folder" | wc -l) wheels, $size MiB in $folder"
if [ "$size" -ge 60 ]; then echo "more than 60 MiB: too large to carry to the GPU machine" >&2; exit 1; fi
