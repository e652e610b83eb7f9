#!/usr/bin/env bash
# Download, on a machine with pip access, the wheels benchmarks/gpu/run.sh installs on a bare GPU
# machine (no network there): the versions pyproject.toml pins, for CPython 3.12 on x86-64 Linux.
# bitsandbytes is slimmed to its CPU and CUDA 13 libraries (43 MB -> ~4 MB) so that everything that
# travels to the device fits its 64 MiB limit.
#   bash benchmarks/gpu/fetch_wheels.sh [DIR]      # default .whl (git-ignored through .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-.whl}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WHEELS="transformers==5.23.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
fsspec==2026.9.0 bitsandbytes==0.50.2"
mkdir -p "$DIR"
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms="$platforms --platform $p"
done
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d "$DIR" $WHEELS 2>&1 | grep -v "^WARNING: Location" || true
"$PYTHON" - "$DIR" <<'PY'
"""Rewrite the bitsandbytes wheel without the GPU libraries torch 2.11+cu130 cannot load."""
import base64, csv, hashlib, io, pathlib, re, sys, zipfile

folder = pathlib.Path(sys.argv[1])
for wheel in folder.glob("bitsandbytes-*.whl"):
    keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
    with zipfile.ZipFile(wheel) as src:
        names = [n for n in src.namelist() if not n.endswith(".so") or keep.search(n)]
        if len(names) == len(src.namelist()):
            continue
        files = {n: src.read(n) for n in names}
    record = next(n for n in files if n.endswith(".dist-info/RECORD"))
    rows = []
    for name, data in files.items():
        if name == record:
            rows.append([name, "", ""])
        else:
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append([name, f"sha256={digest}", str(len(data))])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    files[record] = text.getvalue().encode()
    slim = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in files.items():
            dst.writestr(name, data)
    slim.replace(wheel)
    print(f"slimmed {wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB")
PY
du -sh "$DIR"
