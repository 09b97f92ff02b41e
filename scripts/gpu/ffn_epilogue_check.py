"""MASKAR_FFN_EPILOGUE on a GPU: the FFN's GELU inside cuBLASLt's epilogues against the launches
the training step runs without it, at HMAR-d16's training shapes (rows M, W 1024, hidden 4096).

    python3 scripts/gpu/ffn_epilogue_check.py     # one JSON line per result

Per shape: each result against a float64 reference (relative error, and the unfused path's error
beside it), then CUDA-graph replay times (``qk_norm_sweep.graph_ms``: 10 calls a graph, median of
15 replays, per call) of
- forward: fc1 with its bias in cuBLAS's epilogue + the Triton GELU (maskar.kernels.gelu_bias),
  against one GELU_AUX_BIAS call; fc1 alone for the epilogue's own cost;
- backward: fc2's input gradient (dy @ W2) + the GELU's backward with fc1's bias sum + fc1's weight
  gradient, against a DGELU call + a BGRADB call (fc1's weight and bias gradients); each matmul
  alone, DGELU_BGRAD, and torch's column sum;
then every algorithm the heuristic offers for the three epilogues at 1024 px;
with the floors: the matmul's FLOPs at the step's measured ≈ 750 TFLOP/s and the bytes the fused
call must move at 3.35 TB/s (H100) / 4.8 (H200).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from qk_norm_sweep import graph_ms  # scripts/gpu: CUDA-graph replay timing of a launch

import maskar.kernels.gelu_bias as gb
from maskar.nn import cublaslt, ffn_epilogue

SHAPES = {"1024px-B2": 2 * 9451, "256px-B32": 32 * 680}
C, N = 1024, 4096


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def operands(M: int, seed: int) -> tuple[torch.Tensor, ...]:
    """bf16 x (M, C), fc1's w1 (N, C) and b1, fc2's w2 (C, N), and dy (M, C)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    return r(M, C), r(N, C, scale=C ** -0.5), r(N, scale=0.1), r(C, N, scale=N ** -0.5), r(M, C)


def one_shape(name: str, M: int) -> None:
    x, w1, b1, w2, dy = operands(M, 0)
    # accuracy against float64
    act, pre = cublaslt.linear_gelu_aux(x, w1, b1)
    pre64 = x.double() @ w1.double().T + b1.double()
    act64 = F.gelu(pre64, approximate="tanh")
    pre_u = F.linear(x, w1, b1)
    act_u = gb._forward(pre_u)
    dpre, dbias = cublaslt.matmul_dgelu_bgrad(dy, w2, pre)
    p = pre.double().requires_grad_()
    (dpre64,) = torch.autograd.grad(F.gelu(p, approximate="tanh"), p, dy.double() @ w2.double())
    dpre_u, dbias_u = gb._backward(pre, dy @ w2, True)
    dpre_d, _ = cublaslt.matmul_dgelu_bgrad(dy, w2, pre, False)  # DGELU alone: the default path
    emit({"shape": name, "M": M, "check": "float64", "dpre_dgelu": rel(dpre_d, dpre64),
          "pre": rel(pre, pre64), "act": rel(act, act64), "act_unfused": rel(act_u, act64),
          "dpre": rel(dpre, dpre64), "dpre_unfused": rel(dpre_u, dpre64),
          "dbias": rel(dbias, dpre64.sum(0)), "dbias_unfused": rel(dbias_u, dpre64.sum(0)),
          "fallbacks": ffn_epilogue.FALLBACKS, "plans": cublaslt.plans_made()})
    dpre = dpre_d
    dw, db = cublaslt.weight_grad_bgrad(dpre, x)
    dwt, dbt = cublaslt.weight_grad_t_bgrad(dpre, x)
    dwo, dbo = ffn_epilogue._weight_grad_ones(dpre, x)
    emit({"shape": name, "M": M, "check": "float64 wgrad",
          "dw1": rel(dw, dpre.double().T @ x.double()), "db1": rel(db, dpre.double().sum(0)),
          "dw1_t": rel(dwt.t(), dpre.double().T @ x.double()), "db1_t": rel(dbt, dpre.double().sum(0)),
          "dw1_ones": rel(dwo, dpre.double().T @ x.double()), "db1_ones": rel(dbo, dpre.double().sum(0))})
    flop = 2 * M * C * N
    act_bytes = 2 * M * N

    def bwd_unfused():  # fc2's input gradient, the GELU's backward with fc1's bias sum, fc1's wgrad
        d, _ = gb._backward(pre, dy @ w2, True)
        return d.t() @ x

    def bwd_fused():
        d, _ = cublaslt.matmul_dgelu_bgrad(dy, w2, pre, False)
        return cublaslt.weight_grad_bgrad(d, x)

    t = {
        "fwd_unfused": graph_ms(lambda: gb._forward(F.linear(x, w1, b1))),
        "fwd_fused": graph_ms(lambda: cublaslt.linear_gelu_aux(x, w1, b1)),
        "fc1_alone": graph_ms(lambda: F.linear(x, w1, b1)),
        "bwd_unfused": graph_ms(bwd_unfused),
        "bwd_fused": graph_ms(bwd_fused),
        "dgrad_alone": graph_ms(lambda: dy @ w2),
        "dgelu": graph_ms(lambda: cublaslt.matmul_dgelu_bgrad(dy, w2, pre, False)),
        "dgelu_bgrad": graph_ms(lambda: cublaslt.matmul_dgelu_bgrad(dy, w2, pre, True)),
        "wgrad_alone": graph_ms(lambda: dpre.t() @ x),
        "wgrad_bgradb": graph_ms(lambda: cublaslt.weight_grad_bgrad(dpre, x)),
        "wgrad_t_bgrada": graph_ms(lambda: cublaslt.weight_grad_t_bgrad(dpre, x)),
        "wgrad_t_bgrada_and_transpose":
            graph_ms(lambda: cublaslt.weight_grad_t_bgrad(dpre, x)[0].t().contiguous()),
        "column_sum_torch": graph_ms(lambda: dpre.sum(0)),
        "wgrad_ones_column": graph_ms(lambda: ffn_epilogue._weight_grad_ones(dpre, x)),
    }
    emit({"shape": name, "M": M, **{k: round(v, 4) for k, v in t.items()},
          "fwd_saved_ms": round(t["fwd_unfused"] - t["fwd_fused"], 4),
          "bwd_saved_ms": round(t["bwd_unfused"] - t["bwd_fused"], 4),
          "matmul_floor_ms_750tf": round(flop / 750e12 * 1e3, 4),
          "fused_fwd_bytes_floor_ms_h100": round((2 * M * C + 2 * act_bytes) / 3.35e12 * 1e3, 4),
          "per_step_saved_ms_16_blocks": round(16 * (t["fwd_unfused"] - t["fwd_fused"]
                                                     + t["bwd_unfused"] - t["bwd_fused"]), 3)})


def algos(name: str, M: int) -> None:
    """Every algorithm the heuristic offers (up to 8) for GELU_AUX_BIAS, DGELU (with torch's column
    sum after it too), BGRADB and BGRADA."""
    x, w1, b1, w2, dy = operands(M, 1)
    _, pre = cublaslt.linear_gelu_aux(x, w1, b1)
    want, _ = cublaslt.matmul_dgelu_bgrad(dy, w2, pre, False)
    eps = ((cublaslt.GELU_AUX_BIAS, "fwd"), (cublaslt.DGELU, "bwd_dgelu"), (cublaslt.BGRADB, "wgrad_bgradb"),
           (cublaslt.BGRADA, "wgrad_t_bgrada"))
    for ep, label in eps:
        for i in range(8):
            cublaslt.ALGO_INDEX[ep] = i
            try:
                if label == "fwd":
                    fn = lambda: cublaslt.linear_gelu_aux(x, w1, b1)  # noqa: E731
                elif label == "wgrad_bgradb":
                    fn = lambda: cublaslt.weight_grad_bgrad(want, x)  # noqa: E731
                elif label == "wgrad_t_bgrada":
                    fn = lambda: cublaslt.weight_grad_t_bgrad(want, x)  # noqa: E731
                else:
                    fn = lambda: cublaslt.matmul_dgelu_bgrad(dy, w2, pre, False)  # noqa: E731
                out = fn()
                err = rel(out[0], want) if label == "bwd_dgelu" else 0.0
                rec = {"shape": name, "algos": label, "index": i, "count": cublaslt.algo_count(ep),
                       "ms": round(graph_ms(fn), 4), "rel_to_index0": err}
                if label == "bwd_dgelu":
                    rec["with_sum_ms"] = round(graph_ms(lambda f=fn: f()[0].sum(0)), 4)
                emit(rec)
                if i + 1 >= cublaslt.algo_count(ep):
                    break
            except RuntimeError as e:
                emit({"shape": name, "algos": label, "index": i, "error": str(e)[:200]})
                break
        cublaslt.ALGO_INDEX.pop(ep, None)


def main() -> None:
    p = torch.cuda.get_device_properties(0)
    emit({"device": p.name, "torch": torch.__version__, "cuda": torch.version.cuda,
          "lib": str(cublaslt._lib())})
    for name, M in SHAPES.items():
        one_shape(name, M)
    algos("1024px-B2", SHAPES["1024px-B2"])


if __name__ == "__main__":
    main()
