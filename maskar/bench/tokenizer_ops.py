"""The multi-scale VQ-VAE's generator-side ops: F.interpolate against the matrix form.

    maskar bench tokenizer_ops [cases=256x32,fmnistx768,256x64,1024x8] [reps=20] [warmup=3]
                               [device=auto] [json=PATH]

A case is ``SCHEDULExBATCH``: schedule 256 / 512 / 1024 (the d16 tokenizer ``vae_ch160v4096z32``,
Cz 32, with that resolution's official patch_nums) or ``fmnist`` (the ``vqvae-fmnist`` tokenizer,
Cz 16, scales 1..8). Random token pyramids of BATCH images on a random codebook (normal, so the
maps have a realistic spread). Timed per case, no_grad, fp32, as training and sampling run them:

- ``teacher_forcing_input`` (VAR and HMAR training, stage 1 and 2),
- ``own_residual_input`` (HMAR stage 2 training),
- ``next_input`` over all K scales (the sampling loop's f_hat update and next input),
- ``bicubic`` / ``area``: the resamplings alone, summed over the schedule's scale pairs
  (pn_k -> side and side -> pn_k).

Each under the three ``maskar.tokenizers.resample`` backends: ``interpolate`` (``F.interpolate``,
the code before), ``auto`` (the default: the float64 matrix form for bicubic on CUDA) and
``matmul`` (the matrix form for area too). Median ms of ``reps`` calls after ``warmup`` (CUDA
events on a GPU), and the max relative difference of each output against ``interpolate``
(max |diff| / max |ref|). TF32 matmuls are allowed while timing (as in training), which the
float64 products are immune to.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import torch

from maskar.bench.masked_sampling import measure, timer
from maskar.config import load_config
from maskar.registry import build_model
from maskar.tokenizers import resample
from maskar.tokenizers.vqvae import PATCH_NUMS

DEFAULTS = {"cases": "256x32,fmnistx768,256x64,1024x8", "reps": 20, "warmup": 3, "device": "auto", "json": ""}
OPS = ("teacher_forcing_input", "own_residual_input", "next_input", "bicubic", "area")
SCHEDULES = ("256", "512", "1024", "fmnist")


def _parse(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = dict(DEFAULTS)
    for item in argv:
        k, sep, v = item.partition("=")
        if not sep or k not in DEFAULTS:
            raise SystemExit(
                f"bench tokenizer_ops: expected key=value, key in {sorted(DEFAULTS)}; got {item!r}"
            )
        opts[k] = v
    for k in ("reps", "warmup"):
        try:
            opts[k] = int(opts[k])
        except ValueError:
            raise SystemExit(f"bench tokenizer_ops: {k}: expected an integer, got {opts[k]!r}") from None
    if opts["reps"] < 1 or opts["warmup"] < 0:
        raise SystemExit(f"bench tokenizer_ops: expected reps >= 1 and warmup >= 0, got {opts}")
    opts["cases"] = parse_cases(str(opts["cases"]))
    return opts


def parse_cases(spec: str) -> list[tuple[str, int]]:
    """``"256x32,fmnistx768"`` -> [("256", 32), ("fmnist", 768)]."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        sched, _, batch = item.lower().rpartition("x")
        if sched not in SCHEDULES or not batch.isdigit() or int(batch) < 1:
            raise SystemExit(
                f"bench tokenizer_ops: cases: expected SCHEDULExBATCH with SCHEDULE in {list(SCHEDULES)} "
                f"and BATCH >= 1 (e.g. 256x32, fmnistx768), got {item!r}"
            )
        out.append((sched, int(batch)))
    if not out:
        raise SystemExit("bench tokenizer_ops: cases: expected at least one case")
    return out


def build_tokenizer(schedule: str, device: torch.device):
    """The schedule's multi-scale VQ-VAE with random weights and a normal(0, 1) codebook."""
    if schedule == "fmnist":
        cfg = load_config("vqvae-fmnist").model
    else:
        base = load_config("var-d16").model.tokenizer
        cfg = dataclasses.replace(base, resolution=int(schedule), patch_nums=PATCH_NUMS[int(schedule)])
    torch.manual_seed(0)
    with torch.device(device):
        tok = build_model(cfg).eval()
    with torch.no_grad():
        tok.quantize.embedding.weight.normal_()
    return tok


def case_ops(tok, batch: int, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """The timed calls of one case, each returning one tensor (for the comparison)."""
    g = torch.Generator(device=device).manual_seed(0)
    ids = [
        torch.randint(0, tok.vocab_size, (batch, p * p), device=device, generator=g) for p in tok.patch_nums
    ]
    maps = [tok.embed_map(i, si) for si, i in enumerate(ids)]
    side, pns = tok.latent_side, tok.patch_nums
    fhat0 = torch.zeros(batch, tok.z_channels, side, side, device=device)
    full = tok.indices_to_fhat(ids)

    def sampling() -> torch.Tensor:
        fhat, outs = fhat0, []
        for si, h in enumerate(maps):
            fhat, nxt = tok.next_input(si, fhat, h)
            outs.append(nxt.flatten())
        return torch.cat(outs)

    return {
        "teacher_forcing_input": lambda: tok.teacher_forcing_input(ids),
        "own_residual_input": lambda: tok.own_residual_input(ids),
        "next_input": sampling,
        "bicubic": lambda: torch.cat([tok.bicubic_up(h).flatten() for h in maps[:-1]]),
        "area": lambda: torch.cat([tok.area_down(full, p).flatten() for p in pns[:-1]]),
    }


def max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def run_case(schedule: str, batch: int, opts: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    tok = build_tokenizer(schedule, device)
    ops = case_ops(tok, batch, device)
    time_one, rows = timer(device), []
    for op, fn in ops.items():
        ref, old_ms = None, None
        for name in ("interpolate", "auto", "matmul"):
            with resample.use_backend(name):
                out = fn()
                ms, _ = measure(fn, time_one, opts["warmup"], opts["reps"])
            if ref is None:
                ref, old_ms = out, ms
            rows.append({
                "schedule": schedule, "batch": batch, "z_channels": tok.z_channels,
                "patch_nums": list(tok.patch_nums), "op": op, "backend": name, "ms": ms,
                "speedup": old_ms / ms, "max_rel_vs_interpolate": max_rel(out, ref),
            })  # fmt: skip
            r = rows[-1]
            print(
                f"{schedule:>6} {batch:>5} {op:<22} {name:<12} {ms:>9.3f} {r['speedup']:>8.2f}x "
                f"{r['max_rel_vs_interpolate']:>10.2e}",
                flush=True,
            )
    del tok, ops
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    opts = _parse(list(argv or []))
    name = str(opts["device"])
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    print(f"command: maskar bench tokenizer_ops {' '.join(argv or [])}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as training runs: the float64 products ignore it
        torch.backends.cudnn.allow_tf32 = True
    print(
        f"device {gpu} | torch {torch.__version__} | auto = matrix form for "
        f"{[m for m in resample.MODES if resample.uses_matmul(m, device)] or 'nothing'} on this device"
    )
    print(f"{'sched':>6} {'batch':>5} {'op':<22} {'backend':<12} {'ms':>9} {'speedup':>9} {'max rel':>10}")
    rows = []
    for schedule, batch in opts["cases"]:
        rows += run_case(schedule, batch, opts, device)
    if opts["json"]:
        with open(str(opts["json"]), "w") as f:
            json.dump({"device": gpu, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
