"""AdamW over fp32 master weights whose gradients may be bf16, writing the bf16 working copies (Triton).

With bf16 working copies of the linear weights (:mod:`maskar.train.master_weights`) the forward
reads them directly and the backward writes bf16 gradients. The fp32 weights are then the
optimizer's master copies: this one pass reads a master, its gradient (either dtype), the two
moments, and writes the master, the moments and, for a bf16 gradient, the new working copy.
torch's fused AdamW cannot do this: it wants every tensor of a group in one dtype.

Math, as torch's fused AdamW (``adam_math``, ADAMW mode) in fp32, per element::

    g = grad / grad_scale                 (grad_scale: the clip factor's reciprocal, or 1)
    p = p - lr * wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    low = p rounded to bf16 (round to nearest even, as ``Tensor.to``)

``t`` is each tensor's own step count (torch's ``state["step"]``, on the device) after this
step's increment; the learning rate is read from each group's device tensor, so one CUDA graph
replays the step at any rate. ``b^t`` is ``exp(t * log b)`` in fp32: torch's kernel raises in
fp32 too, so the two agree to a few ulp, not bit for bit (tested against torch's AdamW).

One launch covers many tensors: a table holds each tensor's seven addresses (master, gradient,
two moments, working copy, rate, step) and a second table maps each program to (tensor, first
element). The tables are plain device memory read when the kernel runs, not when it is launched:
inside a CUDA graph capture the gradients' addresses (the graph pool's) are only known at the
capture, so :class:`AdamWLaunch` fills the address table after the capture ends
(:meth:`AdamWLaunch.fill_pending`), before the first replay.

The clipping norm reads the same tables (:meth:`AdamWLaunch.sum_squares`): one program a block
writes its block's sum of squared gradient elements in fp32, and the caller sums the partials
(a fixed order: the same norm at every replay, no atomics). torch's ``_foreach_norm`` over bf16
gradients with an fp32 result runs one reduction kernel a tensor instead (≈ 150 at d16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from maskar.kernels.block_sparse import _launch

# ----------------------------------------------------------------------------- kernel

_ADDRS = 7  # a table row: master, gradient, exp_avg, exp_avg_sq, copy, rate, step (the kernel's 0..6)


@triton.jit
def _adamw_master(ADDRS, NUMEL, WD, CHUNK_T, CHUNK_O, GRAD_SCALE, beta1, beta2, eps,
                  GRAD_T: tl.constexpr, LOW: tl.constexpr, HAS_SCALE: tl.constexpr,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(CHUNK_T + pid)
    start = tl.multiple_of(tl.load(CHUNK_O + pid), BLOCK)
    n = tl.load(NUMEL + t)
    row = ADDRS + t * 7
    p_ptr = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(GRAD_T))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    low_ptr = tl.load(row + 4).to(tl.pointer_type(tl.bfloat16))
    if ALIGNED:  # the addresses come from memory: say what the host checked, for vector access
        p_ptr, g_ptr = tl.multiple_of(p_ptr, 16), tl.multiple_of(g_ptr, 16)
        m_ptr, v_ptr = tl.multiple_of(m_ptr, 16), tl.multiple_of(v_ptr, 16)
        low_ptr = tl.multiple_of(low_ptr, 16)
    lr = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32)))
    step = tl.load(tl.load(row + 6).to(tl.pointer_type(tl.float32)))
    wd = tl.load(WD + t)
    bc1 = 1.0 - tl.exp(step * tl.log(beta1))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))
    step_size = lr / bc1

    scale = tl.load(GRAD_SCALE) if HAS_SCALE else 1.0
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # a whole block: no mask, so the accesses vectorise
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, offs, offs >= 0, lr, wd, scale, step_size, bc2_sqrt,
                     beta1, beta2, eps, LOW, HAS_SCALE, False)  # fmt: skip
    else:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, offs, offs < n, lr, wd, scale, step_size, bc2_sqrt,
                     beta1, beta2, eps, LOW, HAS_SCALE, True)  # fmt: skip


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, offs, ok, lr, wd, scale, step_size, bc2_sqrt,
                 beta1, beta2, eps,
                 LOW: tl.constexpr, HAS_SCALE: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    if MASKED:
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=ok, other=0.0)
        m = tl.load(m_ptr + offs, mask=ok, other=0.0)
        v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    else:
        g = tl.load(g_ptr + offs).to(tl.float32)
        p = tl.load(p_ptr + offs)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    if HAS_SCALE:
        g = g / scale
    p = p - lr * wd * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    if LOW:
        # round to nearest even by hand: the interpreter's cast truncates, the GPU's rounds
        bits = p.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        low = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    if MASKED:
        tl.store(p_ptr + offs, p, mask=ok)
        tl.store(m_ptr + offs, m, mask=ok)
        tl.store(v_ptr + offs, v, mask=ok)
        if LOW:
            tl.store(low_ptr + offs, low, mask=ok)
    else:
        tl.store(p_ptr + offs, p)
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
        if LOW:
            tl.store(low_ptr + offs, low)


@triton.jit
def _sum_squares(ADDRS, NUMEL, CHUNK_T, CHUNK_O, PART, GRAD_T: tl.constexpr, ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    """PART[pid] = sum of the squares of program pid's block of its tensor's gradient, in fp32."""
    pid = tl.program_id(0)
    t = tl.load(CHUNK_T + pid)
    start = tl.multiple_of(tl.load(CHUNK_O + pid), BLOCK)
    n = tl.load(NUMEL + t)
    g_ptr = tl.load(ADDRS + t * 7 + 1).to(tl.pointer_type(GRAD_T))
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(PART + pid, tl.sum(g * g, 0))


# ----------------------------------------------------------------------------- launch

BLOCK = 2048  # elements a program: 16 a thread at 4 warps, vectorised loads of 4 fp32
NUM_WARPS = 4


@dataclass
class AdamWTensors:
    """One launch's tensors: fp32 masters, their gradients (all fp32 or all bf16), fp32 moments,
    each tensor's learning-rate and step tensors (fp32 scalars on the device), its weight decay,
    and for bf16 gradients the bf16 working copies the step writes."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    lrs: list[Tensor]
    steps: list[Tensor]
    weight_decays: list[float]
    lows: list[Tensor] | None = None

    def check(self) -> None:
        n = len(self.params)
        lists = (self.grads, self.exp_avgs, self.exp_avg_sqs, self.lrs, self.steps, self.weight_decays)
        if any(len(x) != n for x in lists) or (self.lows is not None and len(self.lows) != n):
            raise ValueError("adamw_master: every list needs one entry per parameter")
        grad_dtypes = {g.dtype for g in self.grads}
        want_grad = torch.bfloat16 if self.lows is not None else torch.float32
        if grad_dtypes - {want_grad}:
            raise ValueError(
                f"adamw_master: gradients must all be {want_grad} "
                f"({'with' if self.lows is not None else 'without'} working copies), got {grad_dtypes}"
            )
        for i, p in enumerate(self.params):
            same = [self.grads[i], self.exp_avgs[i], self.exp_avg_sqs[i]]
            if self.lows is not None:
                same.append(self.lows[i])
            moments = (p.dtype, self.exp_avgs[i].dtype, self.exp_avg_sqs[i].dtype)
            if moments != (torch.float32,) * 3:
                raise ValueError(f"adamw_master: parameter {i}: master and moments must be fp32: {moments}")
            if self.lows is not None and self.lows[i].dtype != torch.bfloat16:
                got = self.lows[i].dtype
                raise ValueError(f"adamw_master: parameter {i}: working copy must be bf16, got {got}")
            if any(x.shape != p.shape or not x.is_contiguous() for x in [p, *same]):
                raise ValueError(
                    f"adamw_master: parameter {i} {tuple(p.shape)}: its gradient, moments and "
                    "working copy must be contiguous tensors of its shape"
                )
            for x in (self.lrs[i], self.steps[i]):
                if x.dtype != torch.float32 or x.numel() != 1 or x.device != p.device:
                    raise ValueError(
                        f"adamw_master: parameter {i}: learning rate and step must be fp32 scalar "
                        f"tensors on {p.device}, got {x.dtype} {tuple(x.shape)} on {x.device}"
                    )


def _addresses(ts: AdamWTensors) -> Tensor:
    rows = []
    for i, p in enumerate(ts.params):
        low = ts.lows[i] if ts.lows is not None else None
        row = [p, ts.grads[i], ts.exp_avgs[i], ts.exp_avg_sqs[i], low, ts.lrs[i], ts.steps[i]]
        rows.append([x.data_ptr() if x is not None else 0 for x in row])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, _ADDRS)


class AdamWLaunch:
    """The launch tables of one list of tensors (shapes, weight decays: fixed at construction), the
    AdamW launch (:meth:`__call__`) and the gradients' squared norm (:meth:`sum_squares`). Each
    refreshes the address table from the tensors it is given (:meth:`bind`): at once or, inside a
    CUDA graph capture, once the capture has ended (:meth:`fill_pending`)."""

    def __init__(self, ts: AdamWTensors, block: int = BLOCK) -> None:
        ts.check()
        device = ts.params[0].device
        self.block, self.device = block, device
        self.shapes = [tuple(p.shape) for p in ts.params]
        self.low = ts.lows is not None
        numel = [p.numel() for p in ts.params]
        chunk_t, chunk_o = [], []
        for t, n in enumerate(numel):
            for o in range(0, n, block):
                chunk_t.append(t)
                chunk_o.append(o)
        self.n_chunks = len(chunk_t)
        self.numel = torch.tensor(numel, dtype=torch.int64, device=device)
        self.wd = torch.tensor(ts.weight_decays, dtype=torch.float32, device=device)
        self.chunk_t = torch.tensor(chunk_t, dtype=torch.int32, device=device)
        self.chunk_o = torch.tensor(chunk_o, dtype=torch.int64, device=device)
        self.addrs = torch.zeros((len(numel), _ADDRS), dtype=torch.int64, device=device)
        self.partials = torch.zeros(self.n_chunks, dtype=torch.float32, device=device)
        self.aligned = False
        self._pending: Tensor | None = None

    def bind(self, ts: AdamWTensors) -> None:
        """Point the address table at ``ts``' tensors: now, or inside a CUDA graph capture once it
        has ended (:meth:`fill_pending`)."""
        if [tuple(p.shape) for p in ts.params] != self.shapes or (ts.lows is not None) != self.low:
            raise ValueError("adamw_master: the tensors differ from the ones the launch was built for")
        host = _addresses(ts)
        self.aligned = bool((host % 16 == 0).all())  # zeros (no copies) count as aligned
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            self._pending = host  # read by the replays: filled in after the capture
        else:
            self.addrs.copy_(host)

    def sum_squares(self, ts: AdamWTensors) -> Tensor:
        """Bind ``ts`` and return its gradients' sum of squares by block (fp32, ``n_chunks``): the
        squared norm is their sum. The buffer is reused by the next call."""
        self.bind(ts)
        grad_t = tl.bfloat16 if self.low else tl.float32
        _launch(
            _sum_squares, (self.n_chunks,),
            (self.addrs, self.numel, self.chunk_t, self.chunk_o, self.partials),
            dict(GRAD_T=grad_t, ALIGNED=self.aligned, BLOCK=self.block), NUM_WARPS, 1,
        )  # fmt: skip
        return self.partials

    def __call__(self, ts: AdamWTensors, beta1: float, beta2: float, eps: float,
                 grad_scale: Tensor | None = None, bound: bool = False) -> None:  # fmt: skip
        """One AdamW step over ``ts`` (``bound``: :meth:`bind` or :meth:`sum_squares` was just
        called with the same tensors)."""
        if grad_scale is not None and (grad_scale.dtype != torch.float32 or grad_scale.numel() != 1):
            raise ValueError(f"adamw_master: grad_scale must be an fp32 scalar, got {grad_scale.dtype}")
        if not bound:
            self.bind(ts)
        torch._foreach_add_(ts.steps, 1.0)
        scale = grad_scale if grad_scale is not None else self.wd  # any fp32 pointer when unused
        grad_t = tl.bfloat16 if self.low else tl.float32
        _launch(
            _adamw_master, (self.n_chunks,),
            (self.addrs, self.numel, self.wd, self.chunk_t, self.chunk_o, scale, beta1, beta2, eps),
            dict(GRAD_T=grad_t, LOW=self.low, HAS_SCALE=grad_scale is not None, ALIGNED=self.aligned,
                 BLOCK=self.block),
            NUM_WARPS, 1,
        )  # fmt: skip

    def fill_pending(self) -> None:
        """After a CUDA graph capture: write the captured tensors' addresses for the replays."""
        if self._pending is not None:
            self.addrs.copy_(self._pending)
            self._pending = None


# ----------------------------------------------------------------------------- reference


@torch.no_grad()
def adamw_reference_(ts: AdamWTensors, beta1: float, beta2: float, eps: float,
                     grad_scale: Tensor | None = None) -> None:  # fmt: skip
    """The kernel's step in torch, tensor by tensor, fp32 (the CPU path and the tests' reference)."""
    ts.check()
    torch._foreach_add_(ts.steps, 1.0)
    for i, p in enumerate(ts.params):
        lr, step, wd = ts.lrs[i], ts.steps[i], ts.weight_decays[i]
        g = ts.grads[i].float()
        if grad_scale is not None:
            g = g / grad_scale
        m, v = ts.exp_avgs[i], ts.exp_avg_sqs[i]
        bc1 = 1.0 - torch.exp(step * torch.log(torch.tensor(beta1)))
        bc2_sqrt = torch.sqrt(1.0 - torch.exp(step * torch.log(torch.tensor(beta2))))
        p.sub_(lr * wd * p)
        m.mul_(beta1).add_((1.0 - beta1) * g)
        v.mul_(beta2).add_((1.0 - beta2) * g * g)
        p.sub_((lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps))
        if ts.lows is not None:
            ts.lows[i].copy_(p)


__all__ = ["AdamWTensors", "AdamWLaunch", "adamw_reference_", "BLOCK"]
