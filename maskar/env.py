"""The MASKAR_* environment switches: one reader, so a mistyped value stops with a message.

Each switch is read once, when the module that owns it is imported, into a module or class
attribute (tests and benchmarks set that attribute for an A/B in one process). A value other
than the ones a switch takes is a :class:`~maskar.config_base.ConfigError` naming the variable
and the value, not a silent fallback to the default: ``MASKAR_PSA_QKV=yes`` would otherwise run
the default path and its timing would be credited to the switch. :func:`check` reads every
switch at once; the CLI calls it before any command's work (exit 2 on a bad value), and
``maskar info`` lists the switches and their state.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from maskar.config_base import ConfigError


class Switch(NamedTuple):
    default: bool | None  # when unset; None: the owner decides per call, as ``unset`` says
    what: str
    unset: str = ""  # what unset means where ``default`` is None


# Every 0 / 1 switch. docs/kernels.md, docs/var_hmar.md and docs/casmar.md describe each;
# `maskar info` prints them from here.
SWITCHES: dict[str, Switch] = {
    "MASKAR_LINEAR_ACT": Switch(False, "Triton fc1 + GELU matmul, tuned per shape"),
    "MASKAR_HEAD_FUSED": Switch(False, "MAR / CASMAR MLP head's residual blocks as Triton kernels"),
    "MASKAR_FUSED_GELU": Switch(None, "tanh GELU in cuBLASLt's epilogue", "each layer's default"),
    "MASKAR_PSA_WHOLE": Switch(False, "PSA backward over whole sub-grids in the tuner"),
    "MASKAR_DIT_MODULATE": Switch(False, "CASMAR DiT adaLN projection with the modulation in its epilogue"),
    "MASKAR_DIT_RESIDUAL": Switch(False, "CASMAR DiT out_proj / fc2 with the gated residual in the epilogue"),
    "MASKAR_SDPA_CUDNN": Switch(False, "VAR / HMAR dense sampling attention asks for cuDNN first"),
    "MASKAR_DECODE_CHANNELS_LAST": Switch(True, "bf16 VQ-VAE decode in channels-last memory"),
    "MASKAR_GN_FLEXIBLE_LAYOUT": Switch(False, "fused GroupNorm op: any layout Inductor picks"),
    "MASKAR_GN_CB_FAST": Switch(True, "fused GroupNorm: large channels-last calls, channel blocks first"),
    "MASKAR_GN_WIDE_MAPS": Switch(True, "fused GroupNorm: the largest channels-last maps in narrower tiles"),
    "MASKAR_CONV_OUT_KERNEL": Switch(True, "bf16 decode: the 3-channel output conv as one Triton kernel"),
    "MASKAR_GN_RESIDUAL": Switch(False, "bf16 decode: residual sums made by the next fused GroupNorm"),
    "MASKAR_GN_CONV_BIAS": Switch(True, "bf16 decode: the fused GroupNorm adds the conv bias before it"),
    "MASKAR_GRAPH_POOL_RESERVE": Switch(True, "VAR / HMAR sampling graphs reserve their pool in one piece"),
    "MASKAR_DEFER_RESIDUAL": Switch(True, "VAR / HMAR compiled sampling: FFN residual in the next graph"),
    "MASKAR_SAMPLER_KERNEL": Switch(True, "VAR / HMAR top-k / top-p draw as one Triton kernel"),
    "MASKAR_DRAW_GUIDANCE": Switch(True, "VAR / HMAR one-kernel draw makes the CFG guidance itself"),
    "MASKAR_PSA_QKV": Switch(None, "PSA's q, k, v as one matmul", "in CUDA inference"),
    "MASKAR_DECODE_WIDE_ATTN": Switch(True, "tokenizer attention, heads > 256 wide, as two cuBLAS matmuls"),
    "MASKAR_WIDE_SOFTMAX_KERNEL": Switch(True, "wide-head attention's softmax as one Triton pass"),
    "MASKAR_DIT_LOW_RESIDUAL": Switch(False, "CASMAR DiT head's residual stream in bf16 / fp16 (inference)"),
    "MASKAR_ADALN_NORM": Switch(True, "VAR / HMAR training: LayerNorm + modulate, one Triton launch a way"),
    "MASKAR_ADALN_SUMS": Switch(True, "VAR / HMAR training: FFN residual bwd, bias sums in adaln launches"),
    "MASKAR_ADALN_PREFETCH": Switch(False, "VAR / HMAR training: adaln backward loads one row tile ahead"),
    "MASKAR_FFN_EPILOGUE": Switch(True, "VAR / HMAR training: the FFN's GELU in cuBLASLt's epilogues"),
    "MASKAR_QK_RECIPROCAL": Switch(True, "VAR / HMAR training: q/k norm backward multiplies by 1 / norm"),
    "MASKAR_FA4_ONE_CALL": Switch(True, "fa4 backend: VAR's block-causal attention as one masked call"),
    "MASKAR_FA4_LAST_DENSE": Switch(True, "with MASKAR_FA4_ONE_CALL: its backward's last scale dense"),
}
MARGIN = "MASKAR_GRAPH_POOL_MARGIN"  # a number >= 1 (maskar.models.scale_graphs)
MARGIN_DEFAULT = 1.02


def switch(name: str) -> bool | None:
    """The switch ``name``: "1" True, "0" False, unset or empty its default (:data:`SWITCHES`)."""
    default = SWITCHES[name].default
    value = os.environ.get(name, "")
    if value == "":
        return default
    if value not in ("0", "1"):
        raise ConfigError(f"{name}: expected 0 or 1 (or unset), got {value!r}")
    return value == "1"


def margin(text: str | None = None) -> float:
    """The graphs' pool headroom: ``text`` (default: ``MASKAR_GRAPH_POOL_MARGIN``), a number >= 1."""
    if text is None:
        text = os.environ.get(MARGIN, "") or str(MARGIN_DEFAULT)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 1.0:  # also catches nan
        raise ConfigError(f"{MARGIN}: expected a number >= 1, got {text!r}")
    return value


def check() -> None:
    """Read every switch (and the margin): a bad value raises its ConfigError now."""
    for name in SWITCHES:
        switch(name)
    margin()


def shown(name: str) -> str:
    """A switch's state for ``maskar info``: on / off, or what unset means for it."""
    value = switch(name)
    if value is None:
        return SWITCHES[name].unset
    return "on" if value else "off"
