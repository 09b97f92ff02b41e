"""Where the host time of one attention fwd+bwd call goes at a launch-bound shape.

At B 4, H 30, L 680 the fused kernel's GPU work is ~0.1 ms, so a per-call timing measures
the host: Python, the autograd engine, allocations and launches. This times, per call
(mean of ``--n`` calls issued back to back, host clock, GPU drained once at the end):

- ``sdpa``: SDPA + boolean mask through autograd (the peer that wins these rows);
- ``triton``: the fused kernel through its autograd Function (what the library runs);
- ``function_floor``: an autograd Function with the same allocations and saved tensors
  but no kernel launches (what any Python-level autograd Function pays);
- ``launches_only``: the fused kernel's forward and backward launches without autograd.

    python benchmarks/attention_host.py --cases 680:4:30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from maskar.bench.attention import SCHEDULES, _make_inputs
from maskar.nn.attention import ScalePattern, sdpa_attention

CPP_FLOOR = False


class _Floor(torch.autograd.Function):
    """The kernel's autograd Function with its launches removed."""

    @staticmethod
    def forward(ctx, q, k, v, pattern, scale):
        from maskar.kernels.block_sparse import _blhd_empty

        B, H, L, D = q.shape
        o = _blhd_empty(B, H, L, D, q)
        lse = torch.empty(B * H, L, dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.pattern, ctx.scale = pattern, scale
        return o

    @staticmethod
    def backward(ctx, do):
        from maskar.kernels.block_sparse import _grads_empty

        q, k, v, o, lse = ctx.saved_tensors
        B, H, L, D = q.shape
        dq, dk, dv = _grads_empty(B, H, L, D, q)
        return dq, dk, dv, None, None


_CPP_FLOOR = r"""
#include <torch/extension.h>
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Floor : public torch::autograd::Function<Floor> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor q, at::Tensor k, at::Tensor v) {
    auto B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
    auto o = at::empty_strided({B, H, L, D}, {L * H * D, D, H * D, 1}, q.options());
    auto lse = at::empty({B * H, L}, q.options().dtype(at::kFloat));
    ctx->save_for_backward({q, k, v, o, lse});
    return o;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto B = s[0].size(0), H = s[0].size(1), L = s[0].size(2), D = s[0].size(3);
    auto g = at::empty({3, B, L, H, D}, s[0].options()).permute({0, 1, 3, 2, 4});
    return {g[0], g[1], g[2]};
  }
};

at::Tensor floor_apply(at::Tensor q, at::Tensor k, at::Tensor v) { return Floor::apply(q, k, v); }
"""


def _cpp_floor():
    """The same floor as a C++ autograd Function (backward runs without the GIL)."""
    from torch.utils.cpp_extension import load_inline

    mod = load_inline("maskar_host_floor", cpp_sources=[_CPP_FLOOR], functions=["floor_apply"])
    return lambda q, k, v, pattern, scale: mod.floor_apply(q, k, v)


def _host_ms(step, n: int, rounds: int = 5) -> tuple[float, float]:
    """(median over rounds of the host ms per call, ms per call including the GPU drain)."""
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    host, total = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) / n * 1e3)
        total.append((t2 - t0) / n * 1e3)
    return statistics.median(host), statistics.median(total)


def _case(kind: str, L: int, B: int, H: int, dtype, n: int) -> dict[str, tuple[float, float]]:
    import maskar.kernels.block_sparse as bs

    pattern = ScalePattern.from_sides(kind, SCHEDULES[L])
    _, q, k, v = _make_inputs(B, L, H, 64, dtype)
    scale = 64**-0.5
    do = torch.randn(B, H, L, 64, device="cuda", dtype=dtype)

    def through_autograd(fn):
        return lambda: torch.autograd.grad(fn(q, k, v, pattern, scale), (q, k, v), do)

    steps = {
        "sdpa": through_autograd(sdpa_attention),
        "triton": through_autograd(bs.block_sparse_attention),
        "function_floor": through_autograd(_Floor.apply),
    }
    if CPP_FLOOR:
        steps["cpp_function_floor"] = through_autograd(_cpp_floor())
    steps["triton"]()  # tunes forward and backward
    o = bs._blhd_empty(B, H, L, 64, q)
    lse = torch.empty(B * H, L, dtype=torch.float32, device="cuda")
    grads = bs._grads_empty(B, H, L, 64, q)
    fplan = bs._plans[("fwd", pattern, 0, dtype, 64, B * H >= 256)]
    bplan = bs._plans[("bwd", pattern, 0, dtype, 64, B * H >= 256)]
    qk_scale = scale * bs.LOG2E

    def launches_only():
        bs._launch_fwd(q, k, v, o, lse, fplan[1], qk_scale, pattern, fplan[0], fplan[2])
        bs._launch_bwd(q, k, v, o, do, *grads, lse, bplan[1], qk_scale, scale, pattern, bplan[0], bplan[2])

    steps["launches_only"] = launches_only
    return {name: _host_ms(step, n) for name, step in steps.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="680:4:30", help="L:B:H, comma separated")
    ap.add_argument("--patterns", default="block_diagonal,block_causal")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--cpp-floor", action="store_true", help="also a C++ autograd Function floor (compiles)")
    a = ap.parse_args(argv)
    global CPP_FLOOR
    CPP_FLOOR = a.cpp_floor
    if not torch.cuda.is_available():
        raise SystemExit("attention_host: needs a CUDA GPU")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}; host ms per fwd+bwd call "
          f"(issue only / incl. GPU drain), median of 5 rounds of {a.n}")
    for kind in a.patterns.split(","):
        for case in a.cases.split(","):
            L, B, H = (int(x) for x in case.split(":"))
            cells = [f"{name} {h:.3f} / {t:.3f}" for name, (h, t) in _case(kind, L, B, H, dtype, a.n).items()]
            print(f"{kind} L{L} B{B} H{H}: " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
