"""Time ``act(x @ w.T + b)`` on the GPU: the fused Triton kernel against cuBLAS plus the separate
activation kernel, on the MLP shapes of the samplers (``maskar bench linear_act --help``).

Per case (rows x out x in features, an activation) and method, the median over rounds of the mean
time of back-to-back calls (CUDA events), the achieved TFLOP/s and its share of the bf16 matmul
peak, and the HBM floor (x, w and y once at the peak bandwidth). Methods: ``linear`` (``F.linear``
alone: the matmul the fusion must not slow down), ``unfused`` (``F.linear`` then ``F.gelu``: what
runs without the kernel), ``cublaslt`` (tanh GELU in cuBLASLt's epilogue), ``triton:i`` (candidate
config i), ``op`` (the tuned op: the first call times all of the above and keeps the fastest).
Every method's output is compared with ``unfused`` (max |difference| over max |unfused|).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

PEAK_TFLOPS = 790.0  # this H200's measured dense bf16 matmul peak (docs/protocol.md)
PEAK_TBS = 4.3  # HBM, TB/s, as the other floors of docs/benchmarks.md
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# rows x out x in: MAR-B's decoder fc1 at B 64 with CFG (128 x 320 tokens), its encoder at half
# the tokens, its fc2 (no activation: cuBLAS against the kernel as a plain matmul), CASMAR-B's DiT
# fc1 (128 x 256 tokens, width 512), MAR-L's decoder fc1
DEFAULT_CASES = "40960x3072x768:gelu,24576x3072x768:gelu,40960x768x3072:none,32768x2048x512:gelu_tanh," \
                "40960x4096x1024:gelu"


def _time_ms(fn, reps: int, per_round: int = 10) -> float:
    from maskar.kernels.tuning import time_ms

    return time_ms(fn, rounds=reps, per_round=per_round)


def _parse_cases(spec: str) -> list[tuple[int, int, int, str]]:
    from maskar.kernels.linear_act import ACTS

    cases = []
    for item in spec.split(","):
        try:
            dims, act = item.split(":")
            m, n, k = (int(v) for v in dims.split("x"))
        except ValueError:
            raise SystemExit(f"--cases: expected MxNxK:ACT such as 512x256x64:gelu, got {item!r}") from None
        if act not in ACTS or min(m, n, k) < 1:
            raise SystemExit(f"--cases: expected positive sizes and an activation in {ACTS}, got {item!r}")
        cases.append((m, n, k, act))
    return cases


def _wall_ms(fn, reps: int) -> float:
    """CPU (tests under TRITON_INTERPRET): the median wall time of one call."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run_case(
    m: int, n: int, k: int, act: str, dtype: torch.dtype, reps: int, device: str = "cuda"
) -> list[dict]:
    from maskar.kernels import linear_act as la

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g).to(dtype)
    w = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, device=device, generator=g).to(dtype)
    timer = _time_ms if device == "cuda" else _wall_ms
    methods = {"linear": lambda: F.linear(x, w, b), "unfused": lambda: la._launch(x, w, b, act, la.UNFUSED)}
    if act == "gelu_tanh" and device == "cuda":
        methods["cublaslt"] = lambda: la._launch(x, w, b, act, la.CUBLASLT)
    for i, cfg in enumerate(la.CANDIDATES):
        methods[f"triton:{i}"] = lambda cfg=cfg: la._launch(x, w, b, act, cfg)
    methods["op"] = lambda: la.linear_act(x, w, b, act)
    ref = methods["unfused"]().float()
    flop = 2.0 * m * n * k
    floor_ms = max(flop / PEAK_TFLOPS / 1e9, (m * k + n * k + m * n) * x.element_size() / PEAK_TBS / 1e9)
    rows = []
    for name, fn in methods.items():
        row = {"case": f"{m}x{n}x{k}:{act}", "dtype": str(dtype).removeprefix("torch."), "method": name,
               "floor_ms": floor_ms}
        try:
            out = fn()
            row["ms"] = timer(fn, reps)
        except Exception as e:  # a config the GPU cannot run (shared memory, registers)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            continue
        row["tflops"] = flop / row["ms"] / 1e9
        row["rel_diff"] = float((out.float() - ref).abs().max() / ref.abs().max())
        if name.startswith("triton:"):
            row["config"] = repr(la.CANDIDATES[int(name.split(":")[1])])
        rows.append(row)
    key = next((kk for kk in la.tuned_configs() if kk[2:5] == (n, k, act)), None)
    if key is not None:
        rows[-1]["chose"] = repr(la.tuned_configs()[key])
    return rows


def _print_case(m: int, n: int, k: int, act: str, dtype: torch.dtype, rows: list[dict]) -> None:
    base = next((r["ms"] for r in rows if r["method"] == "unfused" and "ms" in r), None)
    print(f"\n{m}x{n}x{k} {act} {dtype}: floor {rows[0]['floor_ms']:.3f} ms")
    print(f"  {'method':<10} {'ms':>8} {'TFLOP/s':>8} {'% peak':>7} {'vs unfused':>10} {'rel diff':>9}")
    for r in rows:
        if "error" in r:
            print(f"  {r['method']:<10} {r['error']}")
            continue
        share = 100 * r["tflops"] / PEAK_TFLOPS
        print(f"  {r['method']:<10} {r['ms']:8.3f} {r['tflops']:8.1f} {share:6.1f}% {base / r['ms']:9.2f}x "
              f"{r['rel_diff']:9.2e} {r.get('config', '')}{r.get('chose', '')}")


def _head_variants(net, t_emb, c_emb, mw, cuda: bool) -> dict:
    def module(x):
        return net.forward_embedded(x, t_emb, c_emb, mw)

    def fused(x):
        return net.forward_embedded(x, t_emb, c_emb, mw, fused=True)

    return {"module, eager": module, "module, compiled": torch.compile(module, disable=not cuda),
            "fused, compiled": torch.compile(fused, disable=not cuda)}


def head_step_rows(
    rows_list: list[int], steps: int, reps: int, device: str = "cuda", width: int = 1024, depth: int = 6
) -> list[dict]:
    """MAR-B's MLP diffusion head (width 1024, 6 blocks, z 768), ``steps`` steps of
    ``forward_embedded`` with the batched modulation under bf16 autocast, per variant: the module
    path's eager kernels, the same compiled (Inductor, the sampler's default), and the fused
    residual blocks (``fused=True``, compiled). On CUDA each variant's steps are captured in one
    CUDA graph and the replay is timed (what the sampler does); µs per step."""
    from maskar.nn import diffloss as dl

    dl.load_fused_kernels()
    torch.manual_seed(0)
    net = dl.DiffLoss(16, 768, depth=depth, width=width).to(device).eval().net
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cuda = device == "cuda"
    out = []
    for n in rows_list:
        x, z = torch.randn(n, 16, device=device), torch.randn(n, 768, device=device)
        with torch.no_grad(), torch.autocast(device, torch.bfloat16):
            c_emb, t_emb = net.cond_embed(z), net.time_embed(torch.full((1,), 5, device=device))
            mw = net.modulation_weights(torch.bfloat16)

            def chain(step, x=x):
                for _ in range(steps):
                    x = x + 1e-3 * step(x)[:, :16].float()
                return x

            ref = None
            for name, fn in _head_variants(net, t_emb, c_emb, mw, cuda).items():
                res = chain(fn)  # compiles, tunes the fused kernels (outside any capture)
                ref = res if ref is None else ref
                diff = float((res - ref).abs().max() / ref.abs().max())
                if cuda:
                    torch.cuda.synchronize()
                    torch.clear_autocast_cache()  # the eager path's weight casts: made inside the capture
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        chain(fn)
                    us = _time_ms(graph.replay, reps, per_round=1) * 1e3 / steps
                else:
                    us = _wall_ms(lambda fn=fn: chain(fn), reps) * 1e3 / steps
                out.append({"case": f"head step, {n} rows", "method": name, "us_per_step": us,
                            "rel_diff_vs_first": diff})
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main` (tests parse documented commands with it)."""
    ap = argparse.ArgumentParser(
        prog="maskar bench linear_act", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"MxNxK:ACT,... (default {DEFAULT_CASES})")
    ap.add_argument("--dtypes", default="bf16", help="some of bf16,fp16")
    ap.add_argument("--reps", type=int, default=7, help="rounds of 10 back-to-back calls (median)")
    ap.add_argument("--head-rows", default="128,512",
                    help="MAR-B head step timing at these row counts (empty: skip)")
    ap.add_argument("--head-steps", type=int, default=50, help="head steps per captured graph")
    ap.add_argument("--json", default=None, help="also write every row to this file")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        head_rows = [int(v) for v in args.head_rows.split(",") if v]
    except ValueError:
        raise SystemExit(f"--head-rows: expected comma-separated counts, got {args.head_rows!r}") from None
    if min(head_rows, default=2) < 2 or args.head_steps < 1:
        raise SystemExit(f"--head-rows / --head-steps: expected counts >= 2 / >= 1, got "
                         f"{args.head_rows!r}, {args.head_steps}")
    cases = _parse_cases(args.cases)
    dtypes = []
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: expected some of {','.join(DTYPES)}, got {d!r}")
        dtypes.append(DTYPES[d])
    if args.reps < 1:
        raise SystemExit(f"--reps: expected a positive count, got {args.reps}")
    if not torch.cuda.is_available():
        raise SystemExit("maskar bench linear_act: needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; peak {PEAK_TFLOPS} TFLOP/s, "
          f"{PEAK_TBS} TB/s")
    rows = []
    for dtype in dtypes:
        for m, n, k, act in cases:
            case_rows = run_case(m, n, k, act, dtype, args.reps)
            rows += case_rows
            _print_case(m, n, k, act, dtype, case_rows)
    if head_rows:
        head = head_step_rows(head_rows, args.head_steps, args.reps)
        rows += head
        print("\nMAR-B head step (width 1024, 6 blocks), bf16 autocast, batched modulation, in a CUDA graph:")
        for r in head:
            print(f"  {r['case']:<22} {r['method']:<18} {r['us_per_step']:8.1f} us/step   "
                  f"rel diff vs the first {r['rel_diff_vs_first']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
