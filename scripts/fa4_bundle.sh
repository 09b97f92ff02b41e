#!/usr/bin/env bash
# Bundle FlashAttention-4 (flash_attn.cute) and its CuTe DSL for a device machine that has no
# internet, in two parts that each fit a device call's 64 MiB carry limit (the DSL's cu13
# library wheel alone is 92 MB; xz brings it to ≈ 64 MB, split in two).
#
#   scripts/fa4_bundle.sh            # here: writes .carry/fa4a (≈ 40 MB) and .carry/fa4b (≈ 34 MB)
# then, on one warm device machine, two calls back to back (the machine keeps ignored files
# between calls while it is held):
#   run carry=[".carry/fa4a"]  command: mkdir -p .persist && cp -r .carry/fa4a .persist/
#   run carry=[".carry/fa4b"]  command: source scripts/gpu/fa4_install.sh && ...
# The repository itself must leave room (checkpoints/ is ≈ 58 MB: keep it out of the tree for
# those calls, e.g. `git rm -r -q --cached checkpoints` and /checkpoints/ in .git/info/exclude,
# undone after).
set -euo pipefail
cd "$(dirname "$0")/.."
FA4=${FA4:-4.0.0b40}
DSL=${DSL:-4.8.1}
W=$(mktemp -d)
pip_dl() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$W" "$@"
}
# the device image has torch, einops, protobuf and cuda-bindings; the rest travels
pip_dl "flash-attn-4==$FA4" "nvidia-cutlass-dsl==$DSL" "nvidia-cutlass-dsl-libs-base==$DSL" \
    "nvidia-cutlass-dsl-libs-core==$DSL" "nvidia-cutlass-dsl-libs-cu13==$DSL" \
    "apache-tvm-ffi<0.2,>=0.1.11" torch-c-dlpack-ext quack-kernels
rm -rf .carry/fa4a .carry/fa4b && mkdir -p .carry/fa4a .carry/fa4b
(mkdir "$W/cu13" && cd "$W/cu13" && python3 -m zipfile -e "$W"/nvidia_cutlass_dsl_libs_cu13-*.whl . \
    && tar cf - . | xz -9e -T2 > "$W/cu13.tar.xz")
split -b 40M "$W/cu13.tar.xz" "$W/cu13.tar.xz.part"
mv "$W/cu13.tar.xz.partaa" .carry/fa4a/
mv "$W"/cu13.tar.xz.part* .carry/fa4b/
find "$W" -maxdepth 1 -name '*.whl' ! -name 'nvidia_cutlass_dsl_libs_cu13-*' -exec mv {} .carry/fa4b/ \;
rm -rf "$W"
du -sh .carry/fa4a .carry/fa4b
