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
- the ``fa4`` backend through autograd per scale and with ``MASKAR_FA4_ONE_CALL`` (maskar's op
  over this one call, maskar.nn.attention_fa4), and the step's saving over 16 layers;
- the output and gradients of every path against the fp32 reference (exact softmax per scale),
  as the largest error relative to the reference's largest entry;
- every path's fwd and fwd + bwd ms, eagerly and as one CUDA graph each (the step is one graph),
  the per-scale path through autograd as the model runs it (its glue included), the one-call
  path also as two direct launches with the op's own mask_mod and maps, at the first block size
  of each direction that FA4 accepts.

OUT=/tmp/out python3 scripts/gpu/fa4_block_causal_probe.py     (a CUDA sm90 GPU, FA4 installed)
"""

from __future__ import annotations

import json
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
# FA4's sm90 heuristics (config.py, b40): head dim 64 forward 192 x 128 tiles, 128 x 128 where the
# sparse q block is no multiple of 192; backward 128 x 128. The fastest first.
FWD_BLOCKS = [(192, 128), (128, 128), (128, 64), (64, 128), (256, 128), (64, 64)]
BWD_BLOCKS = [(128, 128), (64, 128), (128, 64), (64, 64)]
dev, dt = torch.device("cuda"), torch.bfloat16
RECORDS: list[dict] = []


def emit(rec: dict) -> None:
    RECORDS.append(rec)
    print(json.dumps(rec), flush=True)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "res": RES, "batch": B})
    p = ScalePattern.from_sides("block_causal", SIDES[RES])
    L, scale = p.total, D**-0.5
    import maskar.nn.attention_fa4 as fa4_backend

    torch.manual_seed(0)
    buf = torch.randn(B, L, 3, H, D, device=dev, dtype=dt, requires_grad=True)
    # the op's own pieces (the entry its calls use: keyed by q's device): scale ends, mask_mod, maps
    state = fa4_backend._bc_state(list(p.lengths), buf.device)
    ends, mod = state["ends"], state["mod"]
    dout_bhld = torch.randn(B, H, L, D, device=dev, dtype=dt)
    q, k, v = (buf[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views, as the model
    ref = reference(q, k, v, p, dout_bhld)
    flop_f = 4 * pairs(p) * D * H * B
    emit({"L": L, "fwd_tflop": flop_f / 1e12, "fwd_bwd_tflop": 3.5 * flop_f / 1e12})

    # the backend through autograd as the model runs it: per scale, then MASKAR_FA4_ONE_CALL's op

    def backend_row(one_call: bool) -> dict:
        fa4_backend.ONE_CALL = one_call
        row = {"path": "fa4 backend, " + ("one call (MASKAR_FA4_ONE_CALL=1)" if one_call else "per scale")}

        def fwd_bwd():
            buf.grad = None
            attention(q, k, v, p, backend="fa4").backward(dout_bhld)

        try:
            with torch.no_grad():
                out = attention(q, k, v, p, backend="fa4")
            fwd_bwd()
            row["err_out"] = rel(out, ref[0])
            for i, name in enumerate(("dq", "dk", "dv")):
                row[f"err_{name}"] = rel(buf.grad[:, :, i].transpose(1, 2), ref[1 + i])
            with torch.no_grad():
                row["fwd_ms"] = time_ms(lambda: attention(q, k, v, p, backend="fa4"))
            row["fwd_bwd_ms"] = time_ms(fwd_bwd)
            row["graph_fwd_bwd_ms"] = graph_ms_autograd(buf, p, dout_bhld)
            if one_call:
                row["blocks"] = {d: state.get(("block", d == "bwd")) for d in ("fwd", "bwd")}
        except Exception as e:  # noqa: BLE001 - reported; the other paths still run
            row["error"] = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc()
        fa4_backend.ONE_CALL = False
        emit(row)
        return row

    old_row = backend_row(False)
    op_row = backend_row(True)
    if "graph_fwd_bwd_ms" in op_row and "graph_fwd_bwd_ms" in old_row:
        emit({"op_step_saving_ms_16_layers": 16 * (old_row["graph_fwd_bwd_ms"] - op_row["graph_fwd_bwd_ms"])})

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
                bs = fa4_backend._maps(state, (bm, bn), kind == "bwd", buf.device)  # the op's maps
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
