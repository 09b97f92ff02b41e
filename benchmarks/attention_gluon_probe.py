"""Hopper forward attention written in Gluon (Triton's explicit dialect): a measurement probe.

Triton 3.6 puts a full wgmma wait right after every Q K^T product (its pipeliner only keeps
accumulator chains asynchronous), so the softmax of one key tile never overlaps the tensor
cores' work on the next. FlashAttention-3 and cuDNN get much of their Hopper speed from that
overlap. Gluon exposes the asynchronous wgmma, TMA and mbarriers directly, so this probe
schedules it by hand: per key tile j, issue S_{j+1} = Q K_{j+1}^T, run the softmax of S_j
while it computes, then issue O += P_j V_j and wait only for S_{j+1}. K/V tiles come
through a ring of NUM_BUF shared-memory buffers filled by TMA. (This forward keeps P_j V_j
in flight into the next iteration, with P_j in registers; the library's dK/dV kernel found
that kind of schedule unsafe on long walks and retires everything each iteration, so read
these forward times as an optimistic estimate. The forward is not used by the library.)

``--phase dkdv`` times the Gluon dK/dV programs of ``gluon_dkdv_sm90.py`` (beside this script)
on the same dense problems, against the library's Triton dK/dV and dQ programs and cuDNN.

The problem is one dense scale, as inside the big scales of the block-sparse kernel (q, k, v
as (B, H, L, D) views of one (B, L, 3, H, D) buffer, output (B, L, H, D), base-2 LSE), so the
numbers compare directly with ``benchmarks/attention_dense_bound.py`` (times are per
(B, H) problem, measured on REPEAT times the batch so that host launch cost stays hidden).
Every config is checked against fp32 SDPA first and runs in its own process under a timeout.

    python benchmarks/attention_gluon_probe.py                      # all configs, L 1024 and 576
    python benchmarks/attention_gluon_probe.py --one 64 64 3 4      # BM BN NUM_BUF warps, in-process
    python benchmarks/attention_gluon_probe.py --phase dkdv --configs "64 64 3 4"   # Gluon dK/dV
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from maskar.bench.attention import time_back_to_back_ms

LOG2E = 1.4426950408889634
# timed problems have REPEAT x the batch (times divided back): host launch cost stays hidden
REPEAT = 4


@gluon.jit
def _softmax_tile(s, m_i, l_i, qk_scale, p_layout: gl.constexpr, row_o: gl.constexpr):
    """Online-softmax update for raw scores s: (P as the next wgmma's A operand, alpha for O, m, l)."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    p16 = gl.convert_layout(p.to(gl.float16), p_layout)
    return p16, gl.convert_layout(alpha, row_o), m_new, l_i


@gluon.jit
def _load_kv(kv_desc, k_smem, v_smem, k_bar, v_bar, buf, row, col_k, col_v, pred):
    mbarrier.expect(k_bar.index(buf), kv_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(kv_desc, [row, col_k], k_bar.index(buf), k_smem.index(buf), pred=pred)
    mbarrier.expect(v_bar.index(buf), kv_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(kv_desc, [row, col_v], v_bar.index(buf), v_smem.index(buf), pred=pred)


@gluon.jit
def _fwd_span(
    q_desc, kv_desc, O, LSE, L, H, qk_scale,
    BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, NUM_BUF: gl.constexpr, num_warps: gl.constexpr,
):
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    row_kv = b * L
    col_k = (H + h) * D
    col_v = (2 * H + h) * D

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(kv_desc.dtype, [NUM_BUF, BN, D], kv_desc.layout)
    v_smem = gl.allocate_shared_memory(kv_desc.dtype, [NUM_BUF, BN, D], kv_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)

    n_tiles = L // BN
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b * L + pid_m * BM, h * D], q_bar, q_smem)
    for i in gl.static_range(NUM_BUF):
        _load_kv(kv_desc, k_smem, v_smem, k_bar, v_bar, i, row_kv + i * BN, col_k, col_v, i < n_tiles)

    zero_s = gl.zeros([BM, BN], gl.float32, s_layout)
    m_i = gl.full([BM], -1.0e30, gl.float32, row_s)
    l_i = gl.zeros([BM], gl.float32, row_s)
    o = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, o_layout))  # loop-carried as an async accumulator

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    for j in range(n_tiles - 1):
        nb = (j + 1) % NUM_BUF
        mbarrier.wait(k_bar.index(nb), ((j + 1) // NUM_BUF) & 1)
        s_next = warpgroup_mma(q_smem, k_smem.index(nb).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p16, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, p_layout, row_o)
        # outstanding: P V of tile j-1, then S_{j+1}: leaving one retires P V, so O is final
        # and tile j-1's buffers are free for tile j-1+NUM_BUF
        o = warpgroup_mma_wait(1, deps=(o,))
        refill = j - 1 + NUM_BUF
        _load_kv(kv_desc, k_smem, v_smem, k_bar, v_bar, (j + NUM_BUF - 1) % NUM_BUF, row_kv + refill * BN,
                 col_k, col_v, (j >= 1) & (refill < n_tiles))
        o = o * gl.expand_dims(alpha, 1)
        cb = j % NUM_BUF
        mbarrier.wait(v_bar.index(cb), (j // NUM_BUF) & 1)
        o = warpgroup_mma(p16, v_smem.index(cb), o, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_next,))  # retires S_{j+1}; P V of tile j stays in flight
    last = n_tiles - 1
    p16, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, p_layout, row_o)
    o = warpgroup_mma_wait(0, deps=(o,))
    o = o * gl.expand_dims(alpha, 1)
    mbarrier.wait(v_bar.index(last % NUM_BUF), (last // NUM_BUF) & 1)
    o = warpgroup_mma(p16, v_smem.index(last % NUM_BUF), o, is_async=True)
    o = warpgroup_mma_wait(0, deps=(o,))
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NUM_BUF):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))

    o = o / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
    offs_m = pid_m * BM + gl.arange(0, BM, layout=row_o)
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    idx = gl.expand_dims(((b * L + offs_m) * H + h) * D, 1) + gl.expand_dims(offs_d, 0)
    gl.store(O + idx, o.to(gl.float16))
    offs_r = pid_m * BM + gl.arange(0, BM, layout=row_s)
    gl.store(LSE + bh * L + offs_r, m_i + gl.log2(l_i))


def prepare(qkv: torch.Tensor, BM: int, BN: int, num_buf: int, num_warps: int):
    """A launcher of dense attention over qkv (B, L, 3, H, D) fp16 (descriptors built once), and
    its outputs: o as a (B, H, L, D) view, lse."""
    B, L, _, H, D = qkv.shape
    flat = qkv.view(B * L, 3 * H * D)
    q_desc = TensorDescriptor(flat, [B * L, 3 * H * D], [3 * H * D, 1], [BM, D],
                              gl.NVMMASharedLayout.get_default_for([BM, D], gl.float16))
    kv_desc = TensorDescriptor(flat, [B * L, 3 * H * D], [3 * H * D, 1], [BN, D],
                               gl.NVMMASharedLayout.get_default_for([BN, D], gl.float16))
    o = torch.empty(B, L, H, D, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B * H, L, device=qkv.device, dtype=torch.float32)

    def launch():
        _fwd_span[(L // BM, B * H)](q_desc, kv_desc, o, lse, L, H, D**-0.5 * LOG2E, BM, BN, D, num_buf,
                                    num_warps=num_warps)

    return launch, o.permute(0, 2, 1, 3), lse


def one(BM: int, BN: int, num_buf: int, num_warps: int, lengths: list[int], B: int, H: int) -> dict:
    torch.manual_seed(0)
    out = {"cfg": [BM, BN, num_buf, num_warps]}
    # long walks (16-32 key tiles): an in-flight schedule can be right on short ones only
    small = torch.randn(2, 2048, 3, 3, 64, device="cuda", dtype=torch.float16)
    launch, o, lse = prepare(small, BM, BN, num_buf, num_warps)
    launch()
    q, k, v = (t.float() for t in small.permute(2, 0, 3, 1, 4))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ref_lse = torch.logsumexp(q @ k.transpose(-1, -2) * 64**-0.5, -1).reshape(6, 2048) * LOG2E
    out["err"] = float((o.float() - ref).norm() / ref.norm())
    out["lse_err"] = float((lse - ref_lse).abs().max())
    if not (out["err"] < 5e-3 and out["lse_err"] < 1e-2):
        return out | {"skip": "FAILED check"}
    for L in lengths:
        if L % BM or L % BN:
            continue
        qkv = torch.randn(B * REPEAT, L, 3, H, 64, device="cuda", dtype=torch.float16)
        out[f"L{L}_ms"] = time_back_to_back_ms(prepare(qkv, BM, BN, num_buf, num_warps)[0]) / REPEAT
    return out


def _bwd_inputs(qkv: torch.Tensor, do: torch.Tensor):
    """fp32 reference grads dK, dV, and the lse (base 2) and delta the kernel takes."""
    B, L, _, H, D = qkv.shape
    q, k, v = (t.float().requires_grad_(True) for t in qkv.permute(2, 0, 3, 1, 4))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    g = do.permute(0, 2, 1, 3).float()
    dk, dv = torch.autograd.grad(o, (k, v), g)
    lse = (torch.logsumexp(q @ k.transpose(-1, -2) * D**-0.5, -1) * LOG2E).reshape(B * H, L)
    delta = (o * g).sum(-1).reshape(B * H, L)
    return dk, dv, lse.detach().contiguous(), delta.detach().contiguous()


def _library_dkdv(qkv: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, BN: int):
    """A launcher of the Gluon dK/dV programs (``gluon_dkdv_sm90.py``) on one dense scale."""
    import gluon_dkdv_sm90 as sm90  # beside this script

    import maskar.kernels.block_sparse as bs

    B, L, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    dob = do.permute(0, 2, 1, 3)
    _, dk, dv = bs._grads_empty(B, H, L, D, q)
    starts = torch.arange(0, L, BN, dtype=torch.int32)
    items = torch.stack([starts, (starts + BN).clamp(max=L), torch.zeros_like(starts),
                         torch.full_like(starts, L)]).cuda()

    def launch():
        assert sm90.launch(q, k, v, dob, dk, dv, lse, delta, items, D**-0.5 * LOG2E, D**-0.5, BN)

    return launch, dk, dv


def one_dkdv(BM: int, BN: int, num_buf: int, num_warps: int, lengths: list[int], B: int, H: int) -> dict:
    """The Gluon dK/dV programs (their own BLOCK_M, NUM_BUF, warps; BN from the config)."""
    import gluon_dkdv_sm90 as sm90

    torch.manual_seed(0)
    out = {"phase": "dkdv", "cfg": [sm90.BLOCK_M, BN, sm90.NUM_BUF, sm90.NUM_WARPS]}
    small = torch.randn(2, 1024, 3, 3, 64, device="cuda", dtype=torch.float16)
    do = torch.randn(2, 1024, 3, 64, device="cuda", dtype=torch.float16)
    ref_dk, ref_dv, lse, delta = _bwd_inputs(small, do)
    launch, dk, dv = _library_dkdv(small, do, lse, delta, BN)
    launch()
    out["err"] = max(float((dk.float() - ref_dk).norm() / ref_dk.norm()),
                     float((dv.float() - ref_dv).norm() / ref_dv.norm()))
    if not out["err"] < 5e-3:
        return out | {"skip": "FAILED check"}
    for L in lengths:
        qkv = torch.randn(B * REPEAT, L, 3, H, 64, device="cuda", dtype=torch.float16)
        do = torch.randn(B * REPEAT, L, H, 64, device="cuda", dtype=torch.float16)
        lse = torch.randn(B * REPEAT * H, L, device="cuda").abs() + 8.0  # timing only: p stays small
        delta = torch.randn(B * REPEAT * H, L, device="cuda")
        out[f"L{L}_ms"] = time_back_to_back_ms(_library_dkdv(qkv, do, lse, delta, BN)[0]) / REPEAT
    return out


def bwd_references(lengths: list[int], B: int, H: int) -> dict:
    """Backward-only times on the same dense problems: the library's dK/dV and dQ launches
    (split config), its default one-launch backward, and cuDNN's fwd+bwd minus its fwd."""
    out = {}
    for L in lengths:
        out |= _bwd_references_at(L, B * REPEAT, H)
    return out


def _bwd_references_at(L: int, Bt: int, H: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import maskar.kernels.block_sparse as bs
    from maskar.nn.attention import ScalePattern

    out = {}
    qkv = torch.randn(Bt, L, 3, H, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    pat = ScalePattern("block_diagonal", (L,))
    o = bs.block_sparse_attention(q, k, v, pat)
    do = torch.randn_like(o)
    lse = torch.randn(Bt * H, L, device="cuda").abs() + 8.0
    dq, dk, dv = bs._grads_empty(Bt, H, L, 64, q)
    bnd = bs._bounds(pat, q.device)
    qk_scale = 64**-0.5 * LOG2E

    def bwd(cfg, launches):
        bs._launch_bwd(q, k, v, o, do, dq, dk, dv, lse, bnd, qk_scale, 64**-0.5, pat, cfg, launches)

    split = bs.BwdConfig(32, 64, 64, 32, 4, 3, True, 4)
    launches = bs._bwd_launches(pat, split, q.device)
    out[f"library dK/dV L{L}_ms"] = time_back_to_back_ms(lambda: bwd(split, launches[:1])) / REPEAT
    out[f"library dQ L{L}_ms"] = time_back_to_back_ms(lambda: bwd(split, launches[1:])) / REPEAT
    default = bs._bwd_candidates(64)[0]
    dl = bs._bwd_launches(pat, default, q.device)
    out[f"library bwd (one launch) L{L}_ms"] = time_back_to_back_ms(lambda: bwd(default, dl)) / REPEAT

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        with torch.no_grad():
            f = time_back_to_back_ms(sdpa)
        fb = time_back_to_back_ms(lambda: torch.autograd.grad(sdpa(), (q, k, v), do))
    out[f"cudnn bwd L{L}_ms"] = (fb - f) / REPEAT
    return out


def references(lengths: list[int], B: int, H: int) -> dict:
    """cuDNN SDPA and this library's kernel (forward only) on the same dense problems."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from maskar.kernels.block_sparse import block_sparse_attention
    from maskar.nn.attention import ScalePattern

    out = {}
    for L in lengths:
        qkv = torch.randn(B * REPEAT, L, 3, H, 64, device="cuda", dtype=torch.float16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        pat = ScalePattern("block_diagonal", (L,))
        with torch.no_grad():
            out[f"library L{L}_ms"] = time_back_to_back_ms(
                lambda q=q, k=k, v=v, pat=pat: block_sparse_attention(q, k, v, pat)) / REPEAT
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out[f"cudnn L{L}_ms"] = time_back_to_back_ms(
                    lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v)) / REPEAT
    return out


CONFIGS = ["64 64 3 4", "64 128 3 4", "128 64 3 8", "128 128 3 8", "64 64 4 4", "128 64 4 8"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=4, type=int, metavar=("BM", "BN", "NUM_BUF", "WARPS"))
    ap.add_argument("--phase", default="fwd", choices=("fwd", "dkdv"))
    ap.add_argument("--configs", nargs="*", default=CONFIGS)
    ap.add_argument("--lengths", default="1024,576")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=90)
    a = ap.parse_args(argv)
    lengths = [int(x) for x in a.lengths.split(",")]
    if a.one:
        fn = one if a.phase == "fwd" else one_dkdv
        print("RESULT " + json.dumps(fn(*a.one, lengths, a.batch, a.heads)), flush=True)
        return 0
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}; "
          f"dense {a.phase}, B {a.batch}, H {a.heads}, D 64, fp16, ms per call (back-to-back mean)")
    refs = references if a.phase == "fwd" else bwd_references
    print("references: " + json.dumps(refs(lengths, a.batch, a.heads)), flush=True)
    for cfg in a.configs:
        cmd = [sys.executable, __file__, "--one", *cfg.split(), "--phase", a.phase, "--lengths", a.lengths,
               "--batch", str(a.batch), "--heads", str(a.heads)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            res = [ln[7:] for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            err = f"rc {r.returncode}: {r.stderr.strip()[-600:]}"
            print(f"{cfg}: " + (res[0] if res else err), flush=True)
        except subprocess.TimeoutExpired:
            print(f"{cfg}: TIMEOUT after {a.timeout} s (deadlock?)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
