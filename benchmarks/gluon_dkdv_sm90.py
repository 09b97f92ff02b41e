"""Hopper (sm90) dK/dV programs in Gluon: the measurement subject of ``attention_gluon_probe.py``.

Not used by the library. It was built as a Hopper path for the fused kernel's dK/dV programs
(key tiles inside one scale, where every key sees one contiguous query range [qs, qe)), and
measured no faster than the Triton programs, so only the probe keeps it.

Per query tile j of its key tile, a program issues tile j+1's S^T = K Q^T and dP^T = V dO^T,
runs tile j's softmax backward on the CUDA cores while the tensor cores work on them, issues
tile j's dV += P^T dO and dK += dS^T Q, waits for all four and refills tile j's Q / dO buffers
(a TMA ring of NUM_BUF). On one dense 1024-token scale (B 8, H 16, D 64, fp16, H100) that is
0.207 ms, the same as the Triton dK/dV programs (0.208). Keeping tile j's dV, dK products in
flight into the next iteration reached 0.189 ms but computed dK wrongly on long walks,
depending on the ring size; processing two tiles per iteration so that nothing in flight
crosses the loop's back edge is correct but 0.241 ms. Raw numbers:
``docs/results/attention_gluon_dkdv_variants_h100_2026-11-22f.txt``.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # renamed async_load after Triton 3.6; same arguments
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    AVAILABLE = True
except ImportError:  # a Triton without Gluon's Hopper API: the probe's dK/dV phase cannot run
    AVAILABLE = False

BLOCK_M = 64  # query rows per step (the probe's best on the dense scales)
NUM_BUF = 3  # ring of Q / dO tiles; the schedule needs at least 3
NUM_WARPS = 4

if AVAILABLE:

    @gluon.jit
    def _load_tile(desc, smem, bar, buf, row, col, pred):
        mbarrier.expect(bar.index(buf), desc.block_type.nbytes, pred=pred)
        _tma_load(desc, [row, col], bar.index(buf), smem.index(buf), pred=pred)

    @gluon.jit
    def _softmax_bwd(st, dpt, lse_base, delta_base, offs, qe, qk_scale, MASKED: gl.constexpr):
        """P^T and dS^T (fp32) of one query tile; MASKED zeroes the columns at or past qe."""
        if MASKED:
            ok = offs < qe
            lse = gl.load(lse_base + offs, mask=ok, other=0.0)
            delta = gl.load(delta_base + offs, mask=ok, other=0.0)
            pt = gl.where(gl.expand_dims(ok, 0), gl.exp2(st * qk_scale - gl.expand_dims(lse, 0)), 0.0)
        else:
            lse = gl.load(lse_base + offs)
            delta = gl.load(delta_base + offs)
            pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        return pt, pt * (dpt - gl.expand_dims(delta, 0))

    @gluon.jit
    def _attn_bwd_dkdv_sm90(
        q_desc, k_desc, v_desc, do_desc, DK, DV, LSE, DELTA, ITEMS, N_ITEMS, H, L,
        q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, do_rb, do_rh, do_ch, qk_scale, sm_scale,
        BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, NUM_BUF: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """ITEMS (4, N_ITEMS) int32: keys [n0, n_stop) (at most BN, inside one scale) and the
        query range [qs, qe) that sees them. Row r of a tensor for (b, h) is TMA row
        b * rb + h * rh + r at column h * ch (v shares k's row / column map)."""
        it = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        n0 = gl.load(ITEMS + it)
        n_stop = gl.load(ITEMS + N_ITEMS + it)
        qs = gl.load(ITEMS + 2 * N_ITEMS + it)
        qe = gl.load(ITEMS + 3 * N_ITEMS + it)
        dtype: gl.constexpr = q_desc.dtype

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BM, 16])
        g_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=g_layout, k_width=2)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)

        kv_smem = gl.allocate_shared_memory(dtype, [2, BN, D], k_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BM, D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BM, D], do_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_bar = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        do_bar = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar.index(0), count=1)
        mbarrier.init(kv_bar.index(1), count=1)
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(q_bar.index(i), count=1)
            mbarrier.init(do_bar.index(i), count=1)

        n_tiles = (qe - qs + BM - 1) // BM
        q_row = b * q_rb + h * q_rh + qs
        do_row = b * do_rb + h * do_rh + qs
        k_row = b * k_rb + h * k_rh + n0
        _load_tile(k_desc, kv_smem, kv_bar, 0, k_row, h * k_ch, True)
        _load_tile(v_desc, kv_smem, kv_bar, 1, k_row, h * k_ch, True)
        for i in gl.static_range(NUM_BUF):
            _load_tile(q_desc, q_smem, q_bar, i, q_row + i * BM, h * q_ch, i < n_tiles)
            _load_tile(do_desc, do_smem, do_bar, i, do_row + i * BM, h * do_ch, i < n_tiles)

        zero_s = gl.zeros([BN, BM], gl.float32, s_layout)
        dk = gl.zeros([BN, D], gl.float32, g_layout)
        dv = gl.zeros([BN, D], gl.float32, g_layout)
        k = kv_smem.index(0)
        v = kv_smem.index(1)
        mbarrier.wait(kv_bar.index(0), 0)
        mbarrier.wait(kv_bar.index(1), 0)
        mbarrier.wait(q_bar.index(0), 0)
        mbarrier.wait(do_bar.index(0), 0)
        st = warpgroup_mma(k, q_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v, do_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        st, dpt = warpgroup_mma_wait(0, deps=(st, dpt))
        lse_base = LSE + bh.to(gl.int64) * L
        delta_base = DELTA + bh.to(gl.int64) * L
        for j in range(n_tiles - 1):  # every tile but the last is full
            cb = j % NUM_BUF
            nb = (j + 1) % NUM_BUF
            ph = ((j + 1) // NUM_BUF) & 1
            mbarrier.wait(q_bar.index(nb), ph)
            mbarrier.wait(do_bar.index(nb), ph)
            # tile j+1's S^T and dP^T run on the tensor cores during tile j's softmax backward
            st_n = warpgroup_mma(k, q_smem.index(nb).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dpt_n = warpgroup_mma(v, do_smem.index(nb).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            offs = qs + j * BM + gl.arange(0, BM, layout=col_s)
            pt, dst = _softmax_bwd(st, dpt, lse_base, delta_base, offs, qe, qk_scale, False)
            pt16 = gl.convert_layout(pt.to(dtype), a_layout)
            dst16 = gl.convert_layout(dst.to(dtype), a_layout)
            dv = warpgroup_mma(pt16, do_smem.index(cb), dv, is_async=True)
            dk = warpgroup_mma(dst16, q_smem.index(cb), dk, is_async=True)
            # everything retired here: no accumulator or register operand is in flight across
            # the loop's back edge, and tile j's buffers are free for tile j + NUM_BUF
            st, dpt, dv, dk, pt16, dst16 = warpgroup_mma_wait(0, deps=(st_n, dpt_n, dv, dk, pt16, dst16))
            refill = j + NUM_BUF
            _load_tile(q_desc, q_smem, q_bar, cb, q_row + refill * BM, h * q_ch, refill < n_tiles)
            _load_tile(do_desc, do_smem, do_bar, cb, do_row + refill * BM, h * do_ch, refill < n_tiles)
        last = n_tiles - 1
        offs = qs + last * BM + gl.arange(0, BM, layout=col_s)
        pt, dst = _softmax_bwd(st, dpt, lse_base, delta_base, offs, qe, qk_scale, True)
        pt16 = gl.convert_layout(pt.to(dtype), a_layout)
        dst16 = gl.convert_layout(dst.to(dtype), a_layout)
        dv = warpgroup_mma(pt16, do_smem.index(last % NUM_BUF), dv, is_async=True)
        dk = warpgroup_mma(dst16, q_smem.index(last % NUM_BUF), dk, is_async=True)
        dk, dv, pt16, dst16 = warpgroup_mma_wait(0, deps=(dk, dv, pt16, dst16))
        mbarrier.invalidate(kv_bar.index(0))
        mbarrier.invalidate(kv_bar.index(1))
        for i in gl.static_range(NUM_BUF):
            mbarrier.invalidate(q_bar.index(i))
            mbarrier.invalidate(do_bar.index(i))

        # dK, dV are written (B, L, H, D) contiguous, rows of this tile only
        offs_n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, g_layout))
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, g_layout))
        idx = gl.expand_dims(((b.to(gl.int64) * L + offs_n) * H + h) * D, 1) + gl.expand_dims(offs_d, 0)
        ok = gl.expand_dims(offs_n < n_stop, 1)
        gl.store(DK + idx, (dk * sm_scale).to(dtype), mask=ok)
        gl.store(DV + idx, dv.to(dtype), mask=ok)


def row_map(t: Tensor) -> tuple[Tensor, int, int, int] | None:
    """t (B, H, L, D) as a 2D TMA tensor: (2D view, rb, rh, ch) with row b * rb + h * rh + l
    at column h * ch, or None when t's layout has no such view."""
    B, H, L, D = t.shape
    sb, sh, sl, sd = t.stride()
    esz = t.element_size()
    if sd != 1 or t.data_ptr() % 16 or (sl * esz) % 16:
        return None
    if (sb == L * sl or B == 1) and (H == 1 or (sh * esz) % 16 == 0) and (H - 1) * sh + D <= sl:
        view = torch.as_strided(t, (B * L, (H - 1) * sh + D), (sl, 1))  # heads side by side in a row
        return view, L, 0, sh
    if sl == D and (sh == L * D or H == 1) and (sb == H * L * D or B == 1):
        return torch.as_strided(t, (B * H * L, D), (D, 1)), H * L, L, 0  # head-major, contiguous
    return None


def supported(q: Tensor) -> bool:
    """Whether the Gluon dK/dV programs can run for q's device, dtype and head dim at all."""
    return (AVAILABLE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (32, 64)
            and _capability(q.get_device()) == (9, 0))


_caps: dict[int, tuple[int, int]] = {}


def _capability(device: int) -> tuple[int, int]:
    cap = _caps.get(device)
    if cap is None:
        cap = _caps[device] = torch.cuda.get_device_capability(device)
    return cap


def launch(q: Tensor, k: Tensor, v: Tensor, do: Tensor, dk: Tensor, dv: Tensor, lse: Tensor, delta: Tensor,
           items: Tensor, qk_scale: float, sm_scale: float, block_n: int) -> bool:
    """dK, dV of the key tiles in ``items`` (4, n); False (nothing launched) where the Gluon
    programs cannot run: not a Hopper GPU, or a q / k / v / dO layout without a TMA view."""
    if not supported(q):
        return False
    maps = [row_map(t) for t in (q, k, v, do)]
    if any(m is None for m in maps) or maps[1][1:] != maps[2][1:]:
        return False
    B, H, L, D = q.shape
    gdt = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    descs = []
    for (view, *_), rows in zip(maps, (BLOCK_M, block_n, block_n, BLOCK_M)):
        layout = gl.NVMMASharedLayout.get_default_for([rows, D], gdt)
        descs.append(TensorDescriptor(view, list(view.shape), list(view.stride()), [rows, D], layout))
    (_, q_rb, q_rh, q_ch), (_, k_rb, k_rh, k_ch), _, (_, do_rb, do_rh, do_ch) = maps
    n_items = items.shape[1]
    _attn_bwd_dkdv_sm90[(n_items, B * H)](
        *descs, dk, dv, lse, delta, items, n_items, H, L,
        q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, do_rb, do_rh, do_ch, qk_scale, sm_scale,
        BLOCK_M, block_n, D, NUM_BUF, num_warps=NUM_WARPS,
    )
    return True
