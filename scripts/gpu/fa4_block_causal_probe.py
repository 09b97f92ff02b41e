"""VAR's block-causal attention at 1024 px as ONE FlashAttention-4 call (a ``mask_mod`` and
block-sparsity tensors) against the ``fa4`` backend's per-scale calls, forward + backward.

Why: the final step's profile (docs/benchmarks.md, *Run 20*) puts ≈ 2.3 ms of VAR-d16's 1024 px
step on an H100 in glue around the per-scale calls: each call's key and value gradients cover a
prefix of the sequence and are summed (1.4 ms), the outputs concatenated and transposed. One call
over the whole sequence, with each query's scale end as an auxiliary tensor (key j visible to
query i iff j < end(scale(i))) and the tiles classified from the scale ends (skipped, full, or
partial: only partial ones evaluate the mask), would accumulate those gradients inside the
kernel. Whether it is faster depends on FA4's masked-tile path, so this measures it.

What it prints (one JSON line each, all in $OUT/fa4_block_causal_probe.json):
- the block sizes FA4 accepted for its forward and backward block-sparsity tensors (it checks
  them against its tile sizes: every candidate tried, every refusal printed);
- the output and gradients of both paths against the fp32 reference (exact softmax per scale),
  as the largest error relative to the reference's largest entry;
- both paths' fwd and fwd + bwd ms, eagerly and as one CUDA graph each (the step is one graph),
  the per-scale path through autograd as the model runs it (its glue included), the one-call
  path as two direct launches (its output already whole).

OUT=/tmp/out python3 scripts/gpu/fa4_block_causal_probe.py     (a CUDA sm90 GPU, FA4 installed)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fa4_probe import SIDES, pairs, reference, rel  # noqa: E402 - the sibling probe's helpers

from maskar.bench.psa import graph_time_ms  # noqa: E402
from maskar.kernels.tuning import time_ms  # noqa: E402
from maskar.nn.attention import ScalePattern, attention  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
RES, B, H, D = int(os.environ.get("RES", "1024")), int(os.environ.get("BATCH", "2")), 16, 64
FWD_BLOCKS = [(128, 128), (128, 64), (64, 128), (128, 176), (192, 128), (128, 192), (256, 128), (64, 64)]
BWD_BLOCKS = [(64, 128), (128, 128), (128, 64), (64, 64), (80, 128), (128, 96), (192, 128)]
dev, dt = torch.device("cuda"), torch.bfloat16
RECORDS: list[dict] = []


def emit(rec: dict) -> None:
    RECORDS.append(rec)
    print(json.dumps(rec), flush=True)


def token_ends(p: ScalePattern) -> torch.Tensor:
    """(L,) int32: for each token, the end (exclusive) of its scale: the keys it may see."""
    ends = list(itertools.accumulate(p.lengths))
    return torch.tensor([e for n, e in zip(p.lengths, ends) for _ in range(n)], dtype=torch.int32)


def classify(ends: torch.Tensor, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) bool (n_m, n_n) of a (bm x bn) tiling: full where every query row of the
    block sees every key of it (and the block lies inside the sequence), partial where some do."""
    L = ends.numel()
    n_m, n_n = math.ceil(L / bm), math.ceil(L / bn)
    pad = torch.full((n_m * bm - L,), -1, dtype=torch.int64)
    e = torch.cat([ends.long(), pad]).view(n_m, bm)
    e_max = e.max(1).values
    e_min = torch.where(e >= 0, e, torch.iinfo(torch.int64).max).min(1).values
    c0 = torch.arange(n_n) * bn
    c1 = c0 + bn
    full = (c1[None, :] <= e_min[:, None]) & (c1[None, :] <= L)
    partial = (c0[None, :] < e_max[:, None]) & ~full
    return full, partial


def packed(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count (rows,), index (rows, cols)): each row's selected column indices first, ascending."""
    rows, cols = sel.shape
    cnt = sel.sum(1).to(torch.int32)
    idx = torch.zeros(rows, cols, dtype=torch.int32)
    for r in range(rows):
        js = sel[r].nonzero().flatten()
        idx[r, : js.numel()] = js.to(torch.int32)
    return cnt, idx


def sparse_tensors(ends: torch.Tensor, bm: int, bn: int, q_direction: bool):
    """FA4's BlockSparseTensorsTorch for the block-causal pattern: kv blocks per q block (forward)
    or, with ``q_direction``, q blocks per kv block (backward), broadcast over (B, H)."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    full, partial = classify(ends, bm, bn)
    if q_direction:
        full, partial = full.t(), partial.t()
    (mc, mi), (fc, fi) = packed(partial), packed(full)

    def bh(t: torch.Tensor) -> torch.Tensor:
        return t.to(dev).expand(B, H, *t.shape).contiguous()

    return BlockSparseTensorsTorch(mask_block_cnt=bh(mc), mask_block_idx=bh(mi), full_block_cnt=bh(fc),
                                   full_block_idx=bh(fi), block_size=(bm, bn))


def block_causal_mod():
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils as fa_utils

    @cute.jit
    def _mod(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        ends = aux_tensors[0]
        end = fa_utils.scalar_to_ssa(ends[m_idx[0]], cutlass.Int32)
        return n_idx < end

    return _mod


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "res": RES, "batch": B})
    p = ScalePattern.from_sides("block_causal", SIDES[RES])
    L, scale = p.total, D**-0.5
    ends_cpu = token_ends(p)
    ends = ends_cpu.to(dev)
    mod = block_causal_mod()
    torch.manual_seed(0)
    buf = torch.randn(B, L, 3, H, D, device=dev, dtype=dt, requires_grad=True)
    dout_bhld = torch.randn(B, H, L, D, device=dev, dtype=dt)
    q, k, v = (buf[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views, as the model
    ref = reference(q, k, v, p, dout_bhld)
    flop_f = 4 * pairs(p) * D * H * B
    emit({"L": L, "fwd_tflop": flop_f / 1e12, "fwd_bwd_tflop": 3.5 * flop_f / 1e12})

    # the per-scale path (the fa4 backend), through autograd as the model runs it
    def old_fwd_bwd():
        buf.grad = None
        attention(q, k, v, p, backend="fa4").backward(dout_bhld)

    row = old_row = {"path": "fa4 per scale (the backend)"}
    try:
        with torch.no_grad():
            out_old = attention(q, k, v, p, backend="fa4")
        old_fwd_bwd()
        row["err_out"] = rel(out_old, ref[0])
        for i, name in enumerate(("dq", "dk", "dv")):
            row[f"err_{name}"] = rel(buf.grad[:, :, i].transpose(1, 2), ref[1 + i])
        with torch.no_grad():
            row["fwd_ms"] = time_ms(lambda: attention(q, k, v, p, backend="fa4"))
        row["fwd_bwd_ms"] = time_ms(old_fwd_bwd)
        row["graph_fwd_bwd_ms"] = graph_ms_autograd(buf, p, dout_bhld)
    except Exception as e:  # noqa: BLE001 - reported; the new path still runs
        row["error"] = f"{type(e).__name__}: {e}"[:1500]
        traceback.print_exc()
    emit(row)

    # the one-call path: (B, L, H, D) views of the same buffer
    qs, ks, vs = (buf.detach()[:, :, i] for i in range(3))
    dout = dout_bhld.transpose(1, 2).contiguous()

    def fwd(bs):
        return _flash_attn_fwd(qs, ks, vs, softmax_scale=scale, mask_mod=mod, aux_tensors=[ends],
                               block_sparse_tensors=bs, return_lse=True)[:2]

    def bwd(o, s, bs):
        return _flash_attn_bwd(qs, ks, vs, o, dout, s, scale, False, mask_mod=mod, aux_tensors=[ends],
                               block_sparse_tensors=bs)[:3]

    def accepted(kind: str, blocks, run):
        """The first block size FA4 takes for ``kind`` (every refusal printed: it names the sizes it
        wants), and the errors of its result against the reference."""
        for bm, bn in blocks:
            try:
                bs = sparse_tensors(ends_cpu, bm, bn, q_direction=kind == "bwd")
                errs = run(bs)
                torch.cuda.synchronize()
                emit({f"{kind}_block": [bm, bn], "accepted": True, **errs})
                return bs
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {e}"[:600]
                emit({f"{kind}_block": [bm, bn], "accepted": False, "error": err})
        return None

    out, lse = None, None

    def run_fwd(bs):
        nonlocal out, lse
        out, lse = fwd(bs)
        return {"err_out": rel(out.transpose(1, 2), ref[0])}

    def run_bwd(bs):
        grads = bwd(out, lse, bs)
        return {f"err_{n}": rel(g.transpose(1, 2), r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref[1:])}

    fwd_bs = accepted("fwd", FWD_BLOCKS, run_fwd)
    if fwd_bs is None:
        return finish()
    bwd_bs = accepted("bwd", BWD_BLOCKS, run_bwd)
    row = {"path": "fa4 one call, mask_mod + block sparsity", "fwd_block": list(fwd_bs.block_size)}

    def new_fwd_bwd():
        return bwd(*fwd(fwd_bs), bwd_bs)

    try:
        row["fwd_ms"] = time_ms(lambda: fwd(fwd_bs))
        if bwd_bs is not None:
            row["bwd_block"] = list(bwd_bs.block_size)
            row["fwd_bwd_ms"] = time_ms(new_fwd_bwd)
            row["graph_fwd_bwd_ms"] = graph_ms(new_fwd_bwd)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:1500]
        traceback.print_exc()
    for key in ("fwd_ms", "fwd_bwd_ms"):
        if key in row:
            row[key.replace("_ms", "_tflops")] = (1 if key == "fwd_ms" else 3.5) * flop_f / row[key] / 1e9
    if "graph_fwd_bwd_ms" in row and "graph_fwd_bwd_ms" in old_row:
        row["step_saving_ms_16_layers"] = 16 * (old_row["graph_fwd_bwd_ms"] - row["graph_fwd_bwd_ms"])
    emit(row)
    finish()


def graph_ms(fn) -> float:
    return graph_time_ms(lambda: fn, reps=20, warmup=3)


def graph_ms_autograd(buf: torch.Tensor, p: ScalePattern, dout: torch.Tensor) -> float:
    """The per-scale path's fwd + bwd as one CUDA graph (a fresh leaf made on the capture stream,
    autograd.grad), as the training step captures it."""

    def make():
        leaf = buf.detach().clone().requires_grad_()
        q, k, v = (leaf[:, :, i].transpose(1, 2) for i in range(3))
        return lambda: torch.autograd.grad(attention(q, k, v, p, backend="fa4"), leaf, dout)

    return graph_time_ms(make, reps=20, warmup=3)


def finish() -> None:
    with open(os.path.join(OUT, "fa4_block_causal_probe.json"), "w") as f:
        json.dump(RECORDS, f, indent=1)


if __name__ == "__main__":
    main()
