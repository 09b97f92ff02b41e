"""``fa4`` attention backend: FlashAttention-4's Hopper kernels (CuTe DSL), optional.

FlashAttention-4 (``pip install 'maskar[fa4]'``, package ``flash_attn.cute``) ships
warp-specialised forward and backward kernels for sm90 written in CUTLASS's Python DSL and
compiled on first use. Where it is installed this backend registers itself; nothing in
maskar needs it, and without it the backend is simply absent (``available_backends()``).

- ``block_diagonal`` (HMAR): one variable-length call with every (sample, scale) as its own
  sequence, as the ``varlen`` backend does with FlashAttention-2.
- ``block_causal`` (VAR): one dense call per scale (the scale's queries against every key up
  to its end), with the ``scales`` backend's split and prefix views, the small leading scales
  as one masked SDPA call.
- no pattern: one dense call.

The kernels are wrapped as custom ops (``maskar::fa4_fwd`` / ``maskar::fa4_bwd``) with fake
implementations, so torch.compile traces through them without a graph break and CUDA graphs
capture them once they are compiled (the first call of a shape compiles).

``auto`` takes it where it was measured to win: training (autograd on) in fp16 / bf16 on an sm90
GPU over at least ``attention_scales.AUTO_MIN_TOKENS`` tokens, the calls where ``auto`` would
otherwise take ``scales``. On an H100 (2026-12-06, the step as one CUDA graph, 1024 px B 2,
side by side in one process): HMAR-d16 86.6 ms against 95.4 with ``scales``, VAR-d16 122.2
against 136.4. At 256 px B 32 it loses to the fused kernel (84.4 against 74.4 ms), and in
1024 px sampling it gains under 1% (432.4 against 435.3 ms): there it is taken only by name.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from maskar.nn.attention import ScalePattern, register_backend
from maskar.nn.attention_scales import picked_by_auto, scales_attention

try:
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
except Exception as e:  # not installed, or its DSL cannot load here: leave the backend unregistered
    raise ImportError(f"maskar fa4 backend needs flash-attn-4 (flash_attn.cute): {e}") from e


_CU_SEQLENS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _cu_seqlens(seq_lens: list[int], total: int, device: torch.device) -> Tensor:
    """(n + 1,) int32 starts of ``seq_lens`` repeated to cover ``total`` rows, cached per device.

    Built inside the op (not traced): under torch.compile a tensor made from host values is a
    copy in the graph, which CUDA graph capture refuses from pageable memory. The host side is
    pinned and kept, so even a first call during capture is a legal copy."""
    key = (tuple(seq_lens), total, str(device))
    if key not in _CU_SEQLENS:
        reps, rest = divmod(total, sum(seq_lens))
        if rest:
            raise ValueError(f"fa4 attention: {total} rows are not whole repeats of sequences {seq_lens}")
        starts = torch.tensor([0, *itertools.accumulate(seq_lens * reps)], dtype=torch.int32)
        if device.type == "cuda":
            starts = starts.pin_memory()
        _CU_SEQLENS[key] = (starts, starts.to(device, non_blocking=True))
    return _CU_SEQLENS[key][1]


def _lse_shape(q: Tensor, seq_lens: list[int]) -> tuple[int, ...]:
    if not seq_lens:  # (B, Lq, H, D)
        return (q.shape[0], q.shape[2], q.shape[1])
    return (q.shape[1], q.shape[0])  # (total, H, D)


def _varlen_args(q: Tensor, k: Tensor, seq_lens: list[int]) -> dict:
    if not seq_lens:
        return {}
    cu_q, cu_k = _cu_seqlens(seq_lens, q.shape[0], q.device), _cu_seqlens(seq_lens, k.shape[0], k.device)
    n = max(seq_lens)
    return dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=n, max_seqlen_k=n)


@torch.library.custom_op("maskar::fa4_fwd", mutates_args=())
def fa4_fwd(q: Tensor, k: Tensor, v: Tensor, seq_lens: list[int], scale: float) -> tuple[Tensor, Tensor]:
    """out, lse of softmax attention. ``seq_lens`` empty: batched, q (B, Lq, H, D), k / v
    (B, Lk, H, D). Else packed: q, k, v (total, H, D), sequences of ``seq_lens`` repeated."""
    out, lse, *_ = _flash_attn_fwd(
        q, k, v, softmax_scale=scale, return_lse=True, **_varlen_args(q, k, seq_lens)
    )  # fmt: skip
    return out, lse


@fa4_fwd.register_fake
def _(q, k, v, seq_lens, scale):
    return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(_lse_shape(q, seq_lens), dtype=torch.float32)


@torch.library.custom_op("maskar::fa4_bwd", mutates_args=())
def fa4_bwd(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, seq_lens: list[int], scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _flash_attn_bwd(
        q, k, v, out, dout.contiguous(), lse, scale, False, **_varlen_args(q, k, seq_lens)
    )[:3]  # fmt: skip
    return dq, dk, dv


@fa4_bwd.register_fake
def _(q, k, v, out, dout, lse, seq_lens, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, seq_lens, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.seq_lens, ctx.scale = seq_lens, scale


def _backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = fa4_bwd(q, k, v, out, dout, lse, ctx.seq_lens, ctx.scale)
    return dq, dk, dv, None, None


fa4_fwd.register_autograd(_backward, setup_context=_setup_context)


def _dense(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """Dense attention, (B, H, L, D) in and out, through (B, L, H, D) views."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = fa4_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), [], scale)
    return out.transpose(1, 2)


def fa4_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None, scale: float | None = None
) -> Tensor:
    """Attention under ``pattern`` with FlashAttention-4's kernels. q, k, v: (B, H, L, D)."""
    if pattern is None:
        return _dense(q, k, v, scale)
    if pattern.kind == "block_causal":
        return scales_attention(q, k, v, pattern, scale, dense=_dense)
    B, H, L, D = q.shape
    if L != pattern.total:
        raise ValueError(f"fa4 attention: pattern covers {pattern.total} tokens but q has {L}")
    # (B, H, L, D) -> (B*L, H, D): a view when the memory is (B, L, ..., H, D)
    qp, kp, vp = (x.transpose(1, 2).reshape(B * L, H, D) for x in (q, k, v))
    out, _ = fa4_fwd(qp, kp, vp, list(pattern.lengths), D**-0.5 if scale is None else scale)
    return out.view(B, L, H, D).transpose(1, 2)


def supports(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None) -> bool:
    # Its backward accumulates dq with atomics: under torch.use_deterministic_algorithms the
    # call goes to a backend torch can vouch for (or, asked for by name, fails with a message).
    return (
        not torch.are_deterministic_algorithms_enabled()
        and q.is_cuda and q.dim() == 4 and q.dtype in (torch.float16, torch.bfloat16)
        and k.dtype == q.dtype and v.dtype == q.dtype
        and torch.cuda.get_device_capability(q.device)[0] == 9
        and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
        and (pattern is None or (q.shape == k.shape == v.shape and q.shape[-2] == pattern.total))
    )  # fmt: skip


# ahead of scales (4), and only where scales' auto_when holds (module docstring)
register_backend("fa4", fa4_attention, supports, priority=3, auto_when=picked_by_auto)
