# Source on the device machine after scripts/fa4_bundle.sh's two parts have arrived
# (.persist/fa4a from the first call, .carry/fa4b carried by this one): unpacks
# FlashAttention-4 and its CuTe DSL into /tmp/fa4site and puts them on PYTHONPATH.
R=$PWD
S=/tmp/fa4site
if [ ! -f "$S/.complete" ]; then
    if ! ls "$R"/.persist/fa4a/cu13.tar.xz.part* > /dev/null 2>&1 || ! ls "$R"/.carry/fa4b/*.whl > /dev/null 2>&1; then
        echo "fa4_install: .persist/fa4a (the first call's part, kept only while the machine stays warm)" \
             "or .carry/fa4b (this call's carry) is missing: run both calls back to back" >&2
        return 1
    fi
    rm -rf "$S" && mkdir -p "$S"
    cat "$R"/.persist/fa4a/cu13.tar.xz.part* "$R"/.carry/fa4b/cu13.tar.xz.part* \
        | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$S', filter='data')" \
        || return 1
    for w in "$R"/.carry/fa4b/*.whl; do python3 -m zipfile -e "$w" "$S" || return 1; done
    touch "$S/.complete"
fi
# the wheels' .pth (which puts the DSL's packages on sys.path) is not read from PYTHONPATH
export PYTHONPATH="$S:$S/nvidia_cutlass_dsl/dsl_packages:$R${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import flash_attn.cute.interface as i; print('flash_attn.cute from', i.__file__)"
