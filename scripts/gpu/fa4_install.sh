# Source on the device machine after scripts/fa4_bundle.sh's two parts have arrived
# (.persist/fa4a from the first call, .carry/fa4b carried by this one): unpacks
# FlashAttention-4 and its CuTe DSL into /tmp/fa4site and puts them on PYTHONPATH.
R=$PWD
S=/tmp/fa4site
if [ ! -d "$S/flash_attn" ]; then
    mkdir -p "$S"
    for w in "$R"/.carry/fa4b/*.whl; do python3 -m zipfile -e "$w" "$S"; done
    cat "$R"/.persist/fa4a/cu13.tar.xz.part* "$R"/.carry/fa4b/cu13.tar.xz.part* \
        | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$S', filter='data')"
fi
# the wheels' .pth (which puts the DSL's packages on sys.path) is not read from PYTHONPATH
export PYTHONPATH="$S:$S/nvidia_cutlass_dsl/dsl_packages:$R${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import flash_attn.cute.interface as i; print('flash_attn.cute from', i.__file__)"
