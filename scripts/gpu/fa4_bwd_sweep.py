"""FlashAttention-4's Hopper backward configurations on issue 13's 1024 px patterns.

Why: with the ``fa4`` backend HMAR-d16's 1024 px B 2 attention runs its forward at ≈ 420
TFLOP/s and its backward at ≈ 305 (docs/benchmarks.md, run 9); the backward is ≈ 3/4 of the
attention's time in the step. FA4 picks one sm90 backward tile for head dim 64 (FA3's H100
launch: 128 × 128, SdP swapped, two MMA warp groups). This times the other feasible ones
(FA4's own ``sm90_config_search`` list, one per tile shape, and single-field changes of the
default) through maskar's ``fa4`` backend, on the HMAR block-diagonal and the VAR block-causal
pattern (d16: H 16, D 64; bf16; B 2), and checks each one's gradients against the default's and
against an fp32 reference.

Each candidate replaces FA4's selected ``BwdConfig`` (``flash_attn.cute.interface
.select_bwd_config``) with ``dataclasses.replace(default, **fields)`` while it runs.

OUT=/tmp/out python3 scripts/gpu/fa4_bwd_sweep.py   writes $OUT/fa4_bwd_sweep.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback

import torch

from maskar.kernels.tuning import time_ms
from maskar.nn.attention import ScalePattern, attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fa4_probe import reference  # noqa: E402 - the probe's fp32 per-scale attention

OUT = os.environ.get("OUT", "/tmp/out")
DEADLINE_S = float(os.environ.get("DEADLINE_S", "200"))
SIDES_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
H, D, B = 16, 64, 2
dev, dt = torch.device("cuda"), torch.bfloat16
_T = dict(SdP_swapAB=True, dKV_swapAB=False, dQ_swapAB=False)  # the default's swaps

# name -> fields replaced in FA4's default (its selection, FA3's hdim-64 launch)
CANDIDATES: dict[str, dict] = {
    "default": {},
    "PdS1": dict(num_stages_PdS=1),
    "V_in_regs": dict(V_in_regs=True),
    "dQswap": dict(dQ_swapAB=True),
    "dO1": dict(num_stages_dO=1),
    "96x128": dict(tile_m=96, tile_n=128, num_stages_PdS=1, **{**_T, "dQ_swapAB": True},
                   AtomLayoutMSdP=1, AtomLayoutNdKV=2, AtomLayoutMdQ=2),
    "64x128": dict(tile_m=64, tile_n=128, num_stages_PdS=1, **_T,
                   AtomLayoutMSdP=1, AtomLayoutNdKV=2, AtomLayoutMdQ=1),
    "64x192": dict(tile_m=64, tile_n=192, num_stages_PdS=1, SdP_swapAB=False, dKV_swapAB=True,
                   dQ_swapAB=False, AtomLayoutMSdP=1, AtomLayoutNdKV=2, AtomLayoutMdQ=1),
    "128x96": dict(tile_m=128, tile_n=96, num_stages_PdS=1, SdP_swapAB=False, dKV_swapAB=True,
                   dQ_swapAB=False, AtomLayoutMSdP=2, AtomLayoutNdKV=2, AtomLayoutMdQ=2),
    "192x96": dict(tile_m=192, tile_n=96, num_stages_dO=1, num_stages_PdS=1, SdP_swapAB=False,
                   dKV_swapAB=True, dQ_swapAB=True, AtomLayoutMSdP=1, AtomLayoutNdKV=2,
                   AtomLayoutMdQ=2),
}  # fmt: skip


def sweep(kind: str, rows: list, t_start: float) -> None:
    """Every candidate on one 1024 px pattern; rows get one dict per candidate."""
    import flash_attn.cute.interface as fa_interface

    select = fa_interface.select_bwd_config
    p = ScalePattern.from_sides(kind, SIDES_1024)
    torch.manual_seed(0)
    buf = torch.randn(B, p.total, 3, H, D, device=dev, dtype=dt, requires_grad=True)
    q, k, v = (buf[:, :, i].transpose(1, 2) for i in range(3))
    dout = torch.randn(B, H, p.total, D, device=dev, dtype=dt)
    ref = reference(q, k, v, p, dout)[1:]  # the fp32 gradients of q, k, v
    flop_f = 4 * p.density() * p.total**2 * D * H * B
    base = None

    def fwd():
        return attention(q, k, v, p, backend="fa4")

    def fwd_bwd():
        buf.grad = None
        attention(q, k, v, p, backend="fa4").backward(dout)

    for name, fields in CANDIDATES.items():
        if time.perf_counter() - t_start > DEADLINE_S:
            print(f"deadline: {name} and the rest of {kind} skipped", flush=True)
            break
        row = {"kind": kind, "config": name, "fields": fields, "L": p.total,
               "bwd_tflop": 2.5 * flop_f / 1e12}  # fmt: skip
        fa_interface.select_bwd_config = lambda inputs, _f=fields: dataclasses.replace(select(inputs), **_f)
        try:
            t0 = time.perf_counter()
            fwd_bwd()
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            g = [buf.grad[:, :, i].transpose(1, 2).float() for i in range(3)]
            row["err_vs_fp32"] = max(float((a - r).abs().max() / r.abs().max()) for a, r in zip(g, ref))
            if base is None:
                base = g
            row["diff_vs_default"] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g, base))
            with torch.no_grad():
                row["fwd_ms"] = time_ms(fwd)
            row["fwd_bwd_ms"] = time_ms(fwd_bwd)
            row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
            row["bwd_tflops"] = 2.5 * flop_f / row["bwd_ms"] / 1e9
        except Exception as e:  # noqa: BLE001 - an infeasible config is a result
            row["error"] = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc()
        finally:
            fa_interface.select_bwd_config = select
        rows.append(row)
        print(json.dumps(row), flush=True)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    t_start = time.perf_counter()
    info: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}), flush=True)
    for kind in ("block_diagonal", "block_causal"):
        sweep(kind, info["rows"], t_start)
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "fa4_bwd_sweep.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
