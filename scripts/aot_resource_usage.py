"""Registers and spill stack per thread of every Triton tuner candidate, compiled for sm90 without a
GPU (Triton ships ptxas and cuobjdump), to choose or explain candidates between device sessions.

    python scripts/aot_resource_usage.py                       # this environment's Triton
    python scripts/aot_resource_usage.py --json usage.json     # and write the table

Each kernel is compiled as its host code launches it: the real launch functions run on CPU tensors
of the real shapes inside ``tests/helpers_aot.compiles_as_launched``, which compiles every launch
with the argument specialisation Triton's launcher would give it (16-byte aligned pointers, ints
divisible by 16) instead of running it. A compile from a bare signature (no alignment known) is a
different program: scalar loads, more registers, spills the GPU never sees.

The ``wgmma`` / ``reg A`` / ``mma`` columns count, in the PTX, Hopper's warpgroup MMA
(``wgmma.mma_async``), those of them whose A operand comes from registers rather than from a
shared-memory descriptor, and the older warp-level ``mma.sync``. In a matmul, register-A wgmma
is what a prologue that transforms A before the dot compiles to: A's loads then bypass the
shared-memory pipeline. The fused DiT blocks' ``_modulated_linear`` did, and ran at ~80 TFLOP/s on
an H100 (docs/kernels.md). In attention kernels the P @ V product takes P from registers by
design (P is computed there, as in FlashAttention-3). Tiles under 64 rows fall back to mma.sync.

Spills also depend on the Triton version: the H200 machine runs Triton 3.6.0 (the image's; see
docs/kernels.md, *Register spills*), this repository's environment a newer one. To read the
device's compiler here, install that wheel into a side directory and put it first:

    python -m pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python scripts/aot_resource_usage.py

Shapes: PSA at CASMAR-B's head (16 x 16 grid, k 7, H 16, D 64, bf16, the models' fused qkv
layout); block-sparse attention at the 256 px schedule (L 680, H 16, D 64, block-diagonal) and,
for the long-sequence candidates, 1024 px (L 9451); linear_act at MAR-B's fc1 (768 -> 3072, 40960
rows), exact and tanh GELU; adaln_mlp at MAR-B's head (128 rows, width 1024); adaln_modulate and
gated_residual at CASMAR-B's DiT blocks (32,768 rows, width 512); categorical (the top-k / top-p
draw) at VAR / HMAR-d16's last 256 px scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from helpers_aot import compiles_as_launched, resource_usage, tensor_core_ops  # noqa: E402

BF16 = torch.bfloat16


def _qkv(B: int, L: int, H: int, D: int):
    """q, k, v as (B, H, L, D) views of one (B, L, 3, H, D) buffer (the models' layout)."""
    qkv = torch.randn(B, L, 3, H, D, dtype=BF16)
    return [t.transpose(1, 2) for t in qkv.unbind(2)]


def psa_launches():
    import maskar.kernels.neighborhood as nb
    from maskar.kernels.block_sparse import _blhd_empty, _grads_empty

    B, H, D, grid = 1, 16, 64, (16, 16)
    L = grid[0] * grid[1]
    geom = nb.Window(grid, (7, 7), (1, 1), "zeros")
    q, k, v = _qkv(B, L, H, D)
    o = _blhd_empty(B, H, L, D, q)
    lse = torch.empty(B * H, L)
    do = _blhd_empty(B, H, L, D, q)
    for i, cfg in enumerate(nb._fwd_candidates(D)):
        yield "psa_fwd", i, cfg, lambda cfg=cfg: nb._launch_fwd(q, k, v, o, lse, 0.18, geom, cfg)
    for i, cfg in enumerate(nb._bwd_candidates(D)):
        def launch(cfg=cfg):
            dq, dk, dv = _grads_empty(B, H, L, D, q)
            nb._launch_bwd(q, k, v, o, do, dq, dk, dv, lse, torch.empty_like(lse), 0.18, 0.125, geom, cfg)
        yield "psa_bwd", i, cfg, launch


def block_sparse_launches():
    import maskar.kernels.block_sparse as bs
    from maskar.nn.attention import ScalePattern

    B, H, D = 1, 16, 64
    for lengths, long in (((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), False),
                          ((1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64), True)):
        pattern = ScalePattern("block_diagonal", lengths)
        L = sum(n * n for n in lengths)
        q, k, v = _qkv(B, L, H, D)
        o = bs._blhd_empty(B, H, L, D, q)
        do = bs._blhd_empty(B, H, L, D, q)
        lse = torch.empty(B * H, L)
        bnd = bs._bounds(pattern, "cpu")
        cands = bs._bwd_candidates(D, long)
        for i, cfg in enumerate(cands):
            if long and i < len(bs._bwd_candidates(D, False)):
                continue  # listed at 256 px

            def launch(cfg=cfg, q=q, k=k, v=v, o=o, do=do, lse=lse, bnd=bnd, pattern=pattern, L=L):
                dq, dk, dv = bs._grads_empty(B, H, L, D, q)
                bs._launch_bwd(q, k, v, o, do, dq, dk, dv, lse, bnd, 0.18, 0.125, pattern, cfg)
            yield f"block_sparse_bwd L{L}", i, cfg, launch


def linear_act_launches():
    import maskar.kernels.linear_act as la

    x = torch.randn(40960, 768, dtype=BF16)
    w = torch.randn(3072, 768, dtype=BF16)
    b = torch.randn(3072, dtype=BF16)
    for act in ("gelu", "gelu_tanh"):
        for i, cfg in enumerate(la.CANDIDATES):
            yield f"linear_act {act}", i, cfg, lambda cfg=cfg, a=act: la._launch(x, w, b, a, cfg)


def adaln_mlp_launches():
    import maskar.kernels.adaln_mlp as ah

    M, K = 128, 1024
    x = torch.randn(M, K, dtype=BF16)
    mod = torch.randn(M, 3 * K, dtype=BF16)
    w = torch.randn(K, K, dtype=BF16)
    b = torch.randn(K, dtype=BF16)
    lnw, lnb = torch.randn(K), torch.randn(K)
    for i, cfg in enumerate(ah.CANDIDATES):
        def launch(cfg=cfg):
            ah.FORCE_CONFIG = cfg
            try:
                ah.modulated_linear(x, mod, 0, K, lnw, lnb, 1e-6, w, b, "silu")
                ah.gated_residual_linear(x, w, b, x, mod, 2 * K)
            finally:
                ah.FORCE_CONFIG = None
        yield "adaln_mlp", i, cfg, launch


def adaln_modulate_launches():
    """CASMAR-B's DiT adaLN half with the modulation (MASKAR_DIT_MODULATE): 32,768 rows, width 512."""
    import maskar.kernels.adaln_modulate as am

    M, C = 32768, 512
    act, x = torch.randn(M, C, dtype=BF16), torch.randn(M, C)
    w3, b3 = torch.randn(3 * C, C, dtype=BF16), torch.randn(3 * C, dtype=BF16)
    mean, rstd = am.ln_stats(x, 1e-6)
    for i, cfg in enumerate(am.CANDIDATES):
        def launch(cfg=cfg):
            am.FORCE_CONFIG = cfg
            try:
                am.adaln_modulate(act, w3, b3, x, mean, rstd)
            finally:
                am.FORCE_CONFIG = None
        yield "adaln_modulate", i, cfg, launch


def gated_residual_launches():
    """CASMAR-B's DiT out_proj / fc2 with the gated residual (MASKAR_DIT_RESIDUAL): 32,768 rows, width 512."""
    import maskar.kernels.gated_residual as gr

    M, C = 32768, 512
    x, gate, b = torch.randn(M, C), torch.randn(M, C, dtype=BF16), torch.randn(C, dtype=BF16)
    for K in (512, 2048):
        h, w = torch.randn(M, K, dtype=BF16), torch.randn(C, K, dtype=BF16)
        for i, cfg in enumerate(gr.CANDIDATES):
            def launch(cfg=cfg, h=h, w=w):
                gr.FORCE_CONFIG = cfg
                try:
                    gr.gated_residual_stats(h, w, b, x, gate, 1e-6)
                finally:
                    gr.FORCE_CONFIG = None
            yield f"gated_residual K{K}", i, cfg, launch


def categorical_launches():
    """The top-k / top-p draw at VAR / HMAR-d16's last 256 px scale (64 x 256 rows, vocabulary 4096,
    k 900, p 0.96; bf16 logits, as the sampler's chunks pass them, and float32) and a 512 vocabulary."""
    import maskar.kernels.categorical as cat

    for V, dtype in ((4096, BF16), (4096, torch.float32), (512, BF16)):
        x, noise = torch.randn(16384, V, dtype=dtype), torch.ones(16384, V)
        cfg = cat._config(max(16, 1 << (V - 1).bit_length()))
        name = f"categorical V{V} {str(dtype)[6:]}"
        yield name, 0, cfg, lambda x=x, noise=noise: cat.draw(x, noise, 900, 0.96)


GROUPS = {"psa": psa_launches, "block_sparse": block_sparse_launches, "linear_act": linear_act_launches,
          "adaln_mlp": adaln_mlp_launches, "adaln_modulate": adaln_modulate_launches,
          "gated_residual": gated_residual_launches, "categorical": categorical_launches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--only", help=f"groups to list, comma-separated ({', '.join(GROUPS)})")
    args = ap.parse_args()
    import triton

    groups = args.only.split(",") if args.only else list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        ap.error(f"--only: unknown group(s) {unknown}; expected {list(GROUPS)}")
    where = os.path.dirname(triton.__file__)
    print(f"Triton {triton.__version__} ({where}), target sm90, compiled as launched")
    print(f"{'kernel (shape)':<26} {'#':>2} {'launch':<22} {'REG':>4} {'STACK':>5} {'shared':>7} "
          f"{'wgmma':>5} {'reg A':>5} {'mma':>4}  config")
    out = []
    for group in groups:
        for kernel, i, cfg, launch in GROUPS[group]():
            with compiles_as_launched() as found:
                launch()
            for name, compiled in found:
                usage = resource_usage(compiled) or {"REG": -1, "STACK": -1}
                shared = compiled.metadata.shared
                reg, stack = usage["REG"], usage["STACK"]
                tc = tensor_core_ops(compiled)
                print(f"{kernel:<26} {i:>2} {name:<22} {reg:>4} {stack:>5} {shared:>7} {tc['wgmma']:>5} "
                      f"{tc['wgmma_reg_a']:>5} {tc['mma']:>4}  {cfg}", flush=True)
                out.append(dict(kernel=kernel, index=i, launch=name, config=repr(cfg), shared=shared, REG=reg,
                                STACK=stack, **tc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm90", "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
