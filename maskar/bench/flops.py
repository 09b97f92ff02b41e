"""FLOP formulas for ``torch.utils.flop_counter`` that it lacks, registered once on import.

The bench counts a call's FLOPs with ``FlopCounterMode``, which knows aten's matmuls and
attention but not the ops the fast paths route them through: cuBLASLt's GELU epilogue
(``aten._addmm_activation``, VAR / HMAR's FFN and CASMAR's DiT MLP in CUDA inference) and the
tokenizers' wide-head attention (``maskar::wide_head_attention``). Uncounted, they would drop
≈ 20 TFLOP from HMAR-d16's 1024 px B 8 count and with it the printed floor.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from maskar.tokenizers import wide_attention  # noqa: F401  (defines maskar::wide_head_attention)


@register_flop_formula(torch.ops.aten._addmm_activation)
def _addmm_activation_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """As addmm: 2 M N K (the epilogue's activation is not counted, as no elementwise op is)."""
    m, k = a_shape
    return 2 * m * b_shape[1] * k


@register_flop_formula(torch.ops.maskar.wide_head_attention)
def _wide_head_attention_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """q k^T and P v: 2 B Lq Lk D + 2 B Lq Lk Dv."""
    b, lq, d = q_shape
    return 2 * b * lq * k_shape[1] * (d + v_shape[2])
