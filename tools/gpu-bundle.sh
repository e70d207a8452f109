#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what a bare GPU machine lacks to run `salient bench gpu`:
# salient itself (a wheel of this working tree), Ray (repacked without its Java jar so the
# folder stays small enough to carry), webdataset, zarr and their small dependencies. The
# machine is assumed to hold Python 3.12, PyTorch, torchvision, timm, scikit-image and
# their usual company, and to reach no package index. Usage and the one device call:
# BENCHMARKS.md, "Running the GPU checks".
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
python=${PYTHON:-.venv/bin/python}
# The versions this environment runs (and tests) with, so the GPU machine runs the same.
wanted="ray|webdataset|braceexpand|zarr|numcodecs|donfig|crc32c|google-crc32c|msgspec|pydantic"
wanted+="|pydantic.core|annotated-types|typing-inspection|jsonschema|jsonschema-specifications"
wanted+="|referencing|rpds-py"
rm -rf .whl && mkdir -p .whl
"$python" -m pip wheel -q --no-deps -w .whl .
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  $("$python" -m pip freeze 2>/dev/null | grep -i -E "^($wanted)==") "$@"
"$python" - <<'PY'
import glob, os, zipfile

src = glob.glob(".whl/ray-*.whl")[0]  # drop the Java jar and source maps; keep RECORD true
tmp = src + ".slim"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        name = info.filename
        if name.startswith("ray/jars/") or name.endswith(".js.map"):
            continue
        data = zin.read(name)
        if name.endswith(".dist-info/RECORD"):
            data = b"\n".join(line for line in data.split(b"\n")
                              if not line.startswith(b"ray/jars/") and b".js.map," not in line)
        zout.writestr(info, data)
os.replace(tmp, src)
PY
du -sh .whl
