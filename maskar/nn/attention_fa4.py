"""``fa4`` attention backend: FlashAttention-4's Hopper kernels (CuTe DSL), optional.

FlashAttention-4 (``pip install 'maskar[fa4]'``, package ``flash_attn.cute``) ships
warp-specialised forward and backward kernels for sm90 written in CUTLASS's Python DSL and
compiled on first use. Where it is installed this backend registers itself; nothing in
maskar needs it, and without it the backend is simply absent (``available_backends()``).

- ``block_diagonal`` (HMAR): one variable-length call with every (sample, scale) as its own
  sequence, as the ``varlen`` backend does with FlashAttention-2.
- ``block_causal`` (VAR): one masked, block-sparse forward call over the whole pattern; its
  backward in two calls, the last scale dense against every key and the scales before it
  masked (``MASKAR_FA4_ONE_CALL`` / ``MASKAR_FA4_LAST_DENSE``, both on; below). With
  ``MASKAR_FA4_ONE_CALL=0``, one dense call per scale (the scale's queries against every key up
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

import functools
import itertools

import torch
from torch import Tensor

from maskar import env
from maskar.nn.attention import ScalePattern, register_backend
from maskar.nn.attention_scales import picked_by_auto, scales_attention
from maskar.nn.block_sparsity import block_causal_maps, padded_ends

try:
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
except Exception as e:  # not installed, or its DSL cannot load here: leave the backend unregistered
    raise ImportError(f"maskar fa4 backend needs flash-attn-4 (flash_attn.cute): {e}") from e


_PINNED: list[Tensor] = []  # host sides of the copies below, kept for the program's life


def _device_copy(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` through kept pinned memory. A tensor made from host values inside a
    compiled graph is a copy from pageable memory, which CUDA graph capture refuses; from pinned
    memory it is legal, so even a first call during capture works."""
    if device.type != "cuda":
        return t.to(device)
    host = t.pin_memory()
    _PINNED.append(host)
    return host.to(device, non_blocking=True)


_CU_SEQLENS: dict[tuple, Tensor] = {}


def _cu_seqlens(seq_lens: list[int], total: int, device: torch.device) -> Tensor:
    """(n + 1,) int32 starts of ``seq_lens`` repeated to cover ``total`` rows, cached per device
    (built inside the op, not traced: :func:`_device_copy`)."""
    key = (tuple(seq_lens), total, str(device))
    if key not in _CU_SEQLENS:
        reps, rest = divmod(total, sum(seq_lens))
        if rest:
            raise ValueError(f"fa4 attention: {total} rows are not whole repeats of sequences {seq_lens}")
        starts = torch.tensor([0, *itertools.accumulate(seq_lens * reps)], dtype=torch.int32)
        _CU_SEQLENS[key] = _device_copy(starts, device)
    return _CU_SEQLENS[key]


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


# --- block-causal as one call (MASKAR_FA4_ONE_CALL, on by default) ------------------------------
# Query i sees key j iff j < end(scale(i)): a mask_mod reading each query's scale end from an
# auxiliary tensor, and tile maps (maskar.nn.block_sparsity) so that only the few tiles a scale
# boundary cuts evaluate it. FA4's sm90 heuristics (b40, head dim 64): forward tiles 192 x 128
# (128 x 128 where the sparse q block is no multiple of 192), backward 128 x 128.
# Alone it gained nothing in VAR-d16's 1024 px step on an H100: the block-sparse backward lost
# what the removed glue saved. With LAST_DENSE below the step is ~2 ms shorter (docs/kernels.md).
ONE_CALL = bool(env.switch("MASKAR_FA4_ONE_CALL"))
# The backward as two calls: the last scale's queries against every key, unmasked and dense
# (two thirds of the work at 1024 px, where the block-sparse backward was slower than the
# per-scale dense ones), and the scales before it as one masked call; one add of key / value
# gradients over the earlier scales' keys is what is left of the per-scale glue.
LAST_DENSE = bool(env.switch("MASKAR_FA4_LAST_DENSE"))
FWD_BLOCKS = ((192, 128), (128, 128))
BWD_BLOCKS = ((128, 128), (64, 128))
_BC: dict[tuple, dict] = {}  # (lengths, device) -> ends, the mask_mod, the accepted maps per direction


@functools.cache
def _block_causal_mod():
    """One mask_mod object for every pattern (FA4 keys its compiled kernels by the callable's
    hash; the pattern itself is in the auxiliary tensor)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils as fa_utils

    @cute.jit
    def block_causal(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        end = fa_utils.scalar_to_ssa(aux_tensors[0][m_idx[0]], cutlass.Int32)
        return n_idx < end

    return block_causal


def _bc_state(lengths: list[int], device: torch.device) -> dict:
    key = (tuple(lengths), str(device))
    if key not in _BC:
        pattern = ScalePattern("block_causal", tuple(lengths))
        _BC[key] = dict(pattern=pattern, ends=_device_copy(padded_ends(pattern), device),
                        mod=_block_causal_mod(), maps={})  # fmt: skip
    return _BC[key]


def _maps(state: dict, block: tuple[int, int], backward: bool, device: torch.device):
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    key = (block, backward)
    if key not in state["maps"]:
        maps = block_causal_maps(state["pattern"], *block, q_direction=backward)
        # (1, 1, ...): FA4 broadcasts them over batch and heads
        mc, mi, fc, fi = (_device_copy(t, device)[None, None] for t in maps)
        state["maps"][key] = BlockSparseTensorsTorch(mc, mi, fc, fi, block_size=block)
    return state["maps"][key]


def _first_accepted(state: dict, backward: bool, device: torch.device, call):
    """``call(maps)`` with the first block size FA4 takes (remembered); its refusals are
    ValueErrors naming the sizes it wants, raised before any launch."""
    chosen = state.get(("block", backward))
    if chosen is not None:
        return call(_maps(state, chosen, backward, device))
    errors = []
    for block in BWD_BLOCKS if backward else FWD_BLOCKS:
        try:
            result = call(_maps(state, block, backward, device))
        except ValueError as e:
            errors.append(f"{block}: {e}")
            continue
        state[("block", backward)] = block
        return result
    raise ValueError("fa4 block-causal one call: no block size accepted: " + "; ".join(errors))


@torch.library.custom_op("maskar::fa4_block_causal_fwd", mutates_args=())
def fa4_block_causal_fwd(
    q: Tensor, k: Tensor, v: Tensor, lengths: list[int], scale: float
) -> tuple[Tensor, Tensor]:
    """out (B, L, H, D), lse (B, H, L) of block-causal attention over scales of ``lengths``."""
    state = _bc_state(lengths, q.device)

    def call(maps):
        mod, aux = state["mod"], [state["ends"]]
        return _flash_attn_fwd(q, k, v, softmax_scale=scale, mask_mod=mod, aux_tensors=aux,
                               block_sparse_tensors=maps, return_lse=True)[:2]  # fmt: skip

    out, lse = _first_accepted(state, False, q.device, call)
    return out, lse


@fa4_block_causal_fwd.register_fake
def _(q, k, v, lengths, scale):
    return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(_lse_shape(q, []), dtype=torch.float32)


@torch.library.custom_op("maskar::fa4_block_causal_bwd", mutates_args=())
def fa4_block_causal_bwd(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, lengths: list[int], scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    dout = dout.contiguous()
    if LAST_DENSE and len(lengths) > 1:
        return _bc_bwd_last_dense(q, k, v, out, dout, lse, lengths, scale)
    return _bc_bwd_masked(q, k, v, out, dout, lse, lengths, scale)


def _bc_bwd_masked(q, k, v, out, dout, lse, lengths, scale, dq=None):
    """Gradients of the one masked call over every scale of ``lengths``; dq written into
    ``dq`` where given (a view of a larger buffer)."""
    state = _bc_state(lengths, q.device)

    def call(maps):
        return _flash_attn_bwd(q, k, v, out, dout, lse, scale, False, mask_mod=state["mod"],
                               aux_tensors=[state["ends"]], block_sparse_tensors=maps, dq=dq)[:3]  # fmt: skip

    dq, dk, dv = _first_accepted(state, True, q.device, call)
    return dq, dk, dv


def _bc_bwd_last_dense(q, k, v, out, dout, lse, lengths, scale):
    """MASKAR_FA4_LAST_DENSE: the last scale's rows dense against every key, the rows before
    them masked against their own keys; both write their dq rows into one buffer (no
    concatenation) and the second's dk / dv are added over the keys they cover."""
    e = q.shape[1] - lengths[-1]
    dq = torch.empty_like(q)  # as FA4's own (and the fake's) dq
    _, dk, dv = _flash_attn_bwd(
        q[:, e:], k, v, out[:, e:], dout[:, e:], lse[..., e:], scale, False, dq=dq[:, e:]
    )[:3]  # fmt: skip
    _, dk_head, dv_head = _bc_bwd_masked(
        q[:, :e], k[:, :e], v[:, :e], out[:, :e], dout[:, :e], lse[..., :e], lengths[:-1], scale, dq=dq[:, :e]
    )  # fmt: skip
    dk[:, :e] += dk_head
    dv[:, :e] += dv_head
    return dq, dk, dv


@fa4_block_causal_bwd.register_fake
def _(q, k, v, out, dout, lse, lengths, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _bc_backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = fa4_block_causal_bwd(q, k, v, out, dout, lse, ctx.seq_lens, ctx.scale)
    return dq, dk, dv, None, None


fa4_block_causal_fwd.register_autograd(_bc_backward, setup_context=_setup_context)


def _block_causal_one_call(
    q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern, scale: float | None
) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = fa4_block_causal_fwd(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), list(pattern.lengths), scale
    )
    return out.transpose(1, 2)


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
        if ONE_CALL:
            return _block_causal_one_call(q, k, v, pattern, scale)
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
