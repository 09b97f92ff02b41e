"""FlashAttention-4's Hopper kernels against the backends maskar trains with, on the scale
patterns of issue 13 (attention alone, forward + backward).

Why: at 1024 px the training step's attention runs at ≈ 250 TFLOP/s forward + backward with
cuDNN's dense kernels per scale (the ``scales`` backend), and the issue's 1024 px targets need
≈ 400 (docs/benchmarks.md, run 8). FlashAttention-4 (``flash_attn.cute``, CuTe DSL, compiled on
first use) has warp-specialised sm90 forward and backward kernels; this measures whether they
are faster here, per call and inside a CUDA graph, and checks them against an fp32 reference.

For each case (HMAR block-diagonal / VAR block-causal at 256 px B 32, 512 px B 8, 1024 px B 2;
d16: H 16, D 64; bf16; q, k, v as (B, H, L, D) views of one (B, L, 3, H, D) buffer, as the
model's fused qkv gives them):
- the output and the three gradients of each backend against the fp32 reference (``naive``
  per scale: exact softmax in fp32), as the largest error relative to the reference's largest
  entry;
- fwd and fwd + bwd ms (``time_ms``: median of 5 rounds of 8 back-to-back calls), and the
  TFLOP/s of the pattern's attention work (4 · pairs · D · H · B forward, 2.5× that backward);
- for fa4, the same fwd + bwd captured in one CUDA graph and replayed (equal to eager?).

OUT=/tmp/out python3 scripts/gpu/fa4_probe.py   writes $OUT/fa4_probe.json
"""

from __future__ import annotations

import json
import os
import time
import traceback

import torch

from maskar.kernels.tuning import time_ms
from maskar.nn.attention import ScalePattern, attention, available_backends

OUT = os.environ.get("OUT", "/tmp/out")
SIDES = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
CASES = [  # (res, batch, kind)
    (1024, 2, "block_diagonal"), (1024, 2, "block_causal"),
    (256, 32, "block_diagonal"), (256, 32, "block_causal"),
    (512, 8, "block_diagonal"),
]  # fmt: skip
BACKENDS = [b for b in os.environ.get("PROBE_BACKENDS", "fa4,scales,triton").split(",") if b]
H, D = 16, 64
dev, dt = torch.device("cuda"), torch.bfloat16


def pairs(p: ScalePattern) -> int:
    if p.kind == "block_diagonal":
        return sum(n * n for n in p.lengths)
    total, out = 0, 0
    for n in p.lengths:
        total += n
        out += n * total
    return out


def reference(q, k, v, p: ScalePattern, dout):
    """fp32 attention per scale (exact), and its gradients."""
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    outs, start = [], 0
    for n in p.lengths:
        end = start + n
        k0 = start if p.kind == "block_diagonal" else 0
        s = (q32[:, :, start:end] @ k32[:, :, k0:end].transpose(-1, -2)) * D**-0.5
        outs.append(s.softmax(-1) @ v32[:, :, k0:end])
        start = end
    out = torch.cat(outs, 2)
    out.backward(dout.float())
    return out.detach(), q32.grad, k32.grad, v32.grad


def rel(a, b) -> float:
    return float((a.detach().float() - b).abs().max() / b.abs().max())


def measure(row: dict, be: str, buf, p: ScalePattern, dout, ref, flop_f: float) -> None:
    q, k, v = (buf[:, :, i].transpose(1, 2) for i in range(3))

    def fwd():
        return attention(q, k, v, p, backend=be)

    def fwd_bwd():
        buf.grad = None
        attention(q, k, v, p, backend=be).backward(dout)

    t0 = time.perf_counter()
    out = fwd()
    fwd_bwd()
    torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0
    g = buf.grad
    row["err_out"] = rel(out, ref[0])
    for i, name in enumerate(("dq", "dk", "dv")):
        row[f"err_{name}"] = rel(g[:, :, i].transpose(1, 2), ref[1 + i])
    with torch.no_grad():
        row["fwd_ms"] = time_ms(fwd)
    row["fwd_bwd_ms"] = time_ms(fwd_bwd)
    row["fwd_tflops"] = flop_f / row["fwd_ms"] / 1e9
    row["fwd_bwd_tflops"] = 3.5 * flop_f / row["fwd_bwd_ms"] / 1e9
    if be == "fa4":  # the same fwd + bwd as one CUDA graph (the training step is one)
        eager = buf.grad.clone()
        # a fresh leaf and autograd.grad: no AccumulateGrad node left from the default stream
        leaf = buf.detach().clone().requires_grad_()
        q2, k2, v2 = (leaf[:, :, i].transpose(1, 2) for i in range(3))
        # warm up on a side stream first, as the training step does: a capture without it failed
        # in the backward ("legacy stream"), on 2026-12-06
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                torch.autograd.grad(attention(q2, k2, v2, p, backend=be), leaf, dout)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            (grad,) = torch.autograd.grad(attention(q2, k2, v2, p, backend=be), leaf, dout)
        graph.replay()
        torch.cuda.synchronize()
        row["graph_vs_eager_grad"] = float((grad - eager).abs().max())
        row["graph_fwd_bwd_ms"] = time_ms(graph.replay)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "backends": available_backends(), "rows": []}  # fmt: skip
    try:
        import flash_attn
        import flash_attn.cute.interface  # noqa: F401 - what the backend imports

        info["flash_attn"] = getattr(flash_attn, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - reported, the other backends still run
        traceback.print_exc()
        info["flash_attn"] = f"import failed: {e!r}"
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}), flush=True)
    for res, B, kind in CASES:
        p = ScalePattern.from_sides(kind, SIDES[res])
        L = p.total
        torch.manual_seed(0)
        buf = torch.randn(B, L, 3, H, D, device=dev, dtype=dt, requires_grad=True)
        q, k, v = (buf[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views
        dout = torch.randn(B, H, L, D, device=dev, dtype=dt)
        ref = reference(q, k, v, p, dout)
        flop_f = 4 * pairs(p) * D * H * B
        for be in BACKENDS:
            row = {"res": res, "batch": B, "kind": kind, "L": L, "backend": be,
                   "fwd_tflop": flop_f / 1e12, "bwd_tflop": 2.5 * flop_f / 1e12}  # fmt: skip
            try:
                measure(row, be, buf, p, dout, ref, flop_f)
            except Exception as e:  # noqa: BLE001 - one backend's failure is a result, not the end
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
                traceback.print_exc()
            info["rows"].append(row)
            print(json.dumps(row), flush=True)
        del buf, q, k, v, dout, ref
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "fa4_probe.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
