"""Linear head + cross-entropy in row chunks, gradients computed in the forward pass.

``linear_cross_entropy(h, weight, bias, target, row_weight)`` is ``sum_i row_weight_i *
CE(h_i W^T + b, target_i)``, the same value and gradients as ``F.cross_entropy`` on the full
logits, without ever holding the (N, V) logits: rows are processed in chunks of at most
``CHUNK_ELEMENTS / V`` rows. Each chunk computes its logits in the compute dtype (the autocast
dtype, else the input's), then in fp32 the log-sum-exp, the target logit, the arg-max and the
softmax gradient, and at once the chunk's gradients for ``h``, ``W`` and ``b`` (the scalar
loss's backward only scales those by the incoming gradient). So the logits are made once and
never saved; at VAR-d16 256 px, batch 32, that is 21,760 x 4,096 fp32 values (356 MB) not
written and read back several times, and no recomputation.

Rounding follows autocast's ``F.linear`` + ``.float()`` + ``F.cross_entropy``: logits in the
compute dtype, softmax in fp32, the logits' gradient cast to the compute dtype before the two
gradient matmuls; the weight and bias gradients are summed over chunks in fp32 (the full-matrix
path rounds them once to the compute dtype, so these are, if anything, more precise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Logit elements per chunk: 2^25 fp32 values (128 MiB); 8,192 rows at a 4,096-way head.
CHUNK_ELEMENTS = 1 << 25


def _compute_dtype(t: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def chunk_rows(n: int, vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk: equal chunks of at most ``elements`` logits, a multiple of 64 rows."""
    chunks = max(1, math.ceil(n * vocab / elements))
    return max(64, math.ceil(math.ceil(n / chunks) / 64) * 64)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, row_weight, label_smoothing: float, rows: int):
        cdt = _compute_dtype(h)
        needs = ctx.needs_input_grad
        want_grad = needs[0] or needs[1] or (bias is not None and needs[2])
        V = weight.shape[0]
        eps = float(label_smoothing)
        acc = torch.promote_types(cdt, torch.float32)  # softmax / accumulation dtype: fp32 (fp64 in tests)
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(cdt), weight.to(cdt)
            bc = bias.to(cdt) if bias is not None else None
            ce_parts, correct_parts, gh_parts = [], [], []
            gw = torch.zeros(weight.shape, dtype=acc, device=h.device) if want_grad else None
            gb = torch.zeros(V, dtype=acc, device=h.device) if want_grad and bias is not None else None
            for start in range(0, h.shape[0], rows):
                hs = hc[start : start + rows]
                t = target[start : start + rows]
                z = F.linear(hs, wc, bc).to(acc)  # (n, V) logits of this chunk
                lse = torch.logsumexp(z, dim=-1)
                zt = z.gather(1, t.unsqueeze(1)).squeeze(1)
                ce = lse - zt
                if eps > 0:
                    ce = (1 - eps) * ce + eps * (lse - z.mean(-1))
                ce_parts.append(ce)
                correct_parts.append(z.argmax(-1) == t)
                if want_grad:
                    # d(sum_i w_i ce_i)/dz = w_i (softmax(z_i) - (1 - eps) onehot(t_i) - eps / V)
                    w = row_weight[start : start + rows].to(acc).unsqueeze(1)
                    g = torch.exp(z - lse.unsqueeze(1))
                    if eps > 0:
                        g = g - eps / V
                    g = g.scatter_add(1, t.unsqueeze(1), torch.full_like(zt, eps - 1.0).unsqueeze(1)) * w
                    if gb is not None:
                        gb = gb + g.sum(0)
                    g = g.to(cdt)
                    gh_parts.append(g @ wc)
                    gw = gw + (g.t() @ hs).to(acc)
            ce_all, correct = torch.cat(ce_parts), torch.cat(correct_parts)
            loss = (ce_all * row_weight.to(acc)).sum()
        if want_grad:
            gh = torch.cat(gh_parts).to(h.dtype)
            ctx.save_for_backward(gh, gw, gb if gb is not None else gw.new_empty(0))
        ctx.has_bias, ctx.weight_dtype = bias is not None, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(ce_all, correct)
        return loss, ce_all, correct

    @staticmethod
    def backward(ctx, gloss, _gce, _gcorrect):
        gh, gw, gb = ctx.saved_tensors
        gb = (gb * gloss).to(ctx.bias_dtype) if ctx.has_bias else None
        return gh * gloss.to(gh.dtype), (gw * gloss).to(ctx.weight_dtype), gb, None, None, None, None


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    row_weight: Tensor,
    label_smoothing: float = 0.0,
    rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted cross-entropy of the logits ``h @ weight.T + bias``, chunked over rows.

    h (N, C); weight (V, C); bias (V,) or None; target (N,) int64; row_weight (N,).
    Returns ``(loss, ce, correct)``: the scalar ``sum(row_weight * ce)`` (differentiable
    w.r.t. h, weight and bias), and, without gradients, the per-row cross-entropy ce (N,)
    fp32 and whether the arg-max logit is the target, (N,) bool.
    """
    if h.dim() != 2 or target.shape != h.shape[:1] or row_weight.shape != h.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: expected h (N, C), target (N,), row_weight (N,); got "
            f"{tuple(h.shape)}, {tuple(target.shape)}, {tuple(row_weight.shape)}"
        )
    rows = chunk_rows(h.shape[0], weight.shape[0]) if rows is None else int(rows)
    return _LinearCrossEntropy.apply(h, weight, bias, target, row_weight, float(label_smoothing), rows)
