#!/usr/bin/env bash
# Compiles every csrc/**/*.cu to an object file against torch's headers, so CUDA code cannot rot unseen
# on machines whose torch cannot link or run it.
set -euo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
mapfile -t incs < <("$PY" -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths(): print(p)
print(sysconfig.get_paths()['include'])")
flags=(-std=c++17 -O1 -DWITH_CUDA -Icsrc --expt-relaxed-constexpr -Xcompiler -fPIC -D_GLIBCXX_USE_CXX11_ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
       -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H)
for i in "${incs[@]}"; do flags+=(-I"$i"); done
out=$(mktemp -d)
n=0
while IFS= read -r -d '' f; do
    echo "nvcc -c $f"
    nvcc "${flags[@]}" -c "$f" -o "$out/$(basename "$f").o"
    n=$((n + 1))
done < <(find csrc -name '*.cu' -print0 | sort -z)
echo "compiled $n CUDA source(s)"
