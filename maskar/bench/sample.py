"""Sampling benchmark of VAR-d16 and HMAR-d16: one class-conditional batch, tokens to pixels.

    maskar bench sample [models=var-d16,hmar-d16] [cases=256x64,1024x8] [precision=bf16] [reps=3]
                        [warmup=1] [backend=auto] [cfg=1.5] [top_k=900] [top_p=0.96]
                        [schedule=preset] [hmar_stage=2] [check=true] [seed=0] [tf32=false]
                        [device=auto] [json=PATH]

One timed call = ``model.generate(labels, **knobs)`` under the precision's autocast, exactly
what ``maskar sample`` runs per batch: every scale (VAR with its KV cache; HMAR one scale at
a time plus its masked-refinement passes), CFG on the doubled batch, top-k / top-p sampling
and the frozen VQ-VAE decoding the final f_hat to pixels (the tokenizer always runs in fp32).
The uint8 conversion and the copy to the host are not timed. Weights are random (the
official init), built from the presets: ``var-d16`` and ``hmar-d16`` with ``model.stage=2``
(``hmar_stage``), so HMAR holds its mask branch (467.7M parameters, as the released model)
and refines with the schedule of the preset's sample config (``schedule=preset``; official
default where it sets none) or the official ``benchmark/inference.py`` tables
(``schedule=official_bench``). Resolutions other than the preset's override
``model.tokenizer.resolution`` / ``patch_nums`` with the official tables (1024 px:
1,2,3,4,5,7,9,12,16,21,27,36,48,64; there is no 1024 px d16 preset). Sampling knobs follow
the official benchmark's: cfg 1.5, top_k 900, top_p 0.96, for both models. The table has no
column for the official code: a peer figure belongs beside ours only when measured on the same
GPU in the same run (docs/benchmarks.md gives the official code's separate measurement).

Before timing, each case is checked: the same seed twice gives identical tokens and images,
images are finite and in [-1, 1], token ids are in the codebook, the public ``generate``
returns the same images as the checked run, and the per-scale conditional logits of the
sampling path (VAR: KV cache; HMAR: one scale alone) match a teacher-forced forward on the
sampled tokens of two samples (relative max difference). The first call (CUDA/cuDNN
initialisation, allocator growth) is reported apart as ``first s``; the determinism repeat
and ``warmup`` public calls are not timed; ``ms`` is the median of ``reps`` calls (CUDA
events on GPU, wall clock on CPU); peak memory is ``torch.cuda.max_memory_allocated`` over
the timed calls (weights included), in GB = 1e9 bytes.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from typing import Any

import torch

from maskar.config import load_config
from maskar.sampling import autocast_for, sampling_kwargs

DEFAULTS = {
    "models": "var-d16,hmar-d16", "cases": "256x64,1024x8", "precision": "bf16", "reps": 3, "warmup": 1,
    "backend": "auto", "cfg": 1.5, "top_k": 900, "top_p": 0.96, "schedule": "preset", "hmar_stage": 2,
    "check": True, "seed": 0, "tf32": False, "device": "auto", "json": "",
}  # fmt: skip

# Mask schedules of the official benchmark/inference.py (reference hmar_var.md §4.5).
OFFICIAL_BENCH_SCHEDULES = {
    (1, 2, 3, 4, 5, 6, 8, 10, 13, 16): [[1], [1, 3], [1, 3, 5], [16], [25], [36], [64], [100], [169], [256]],
    (1, 2, 3, 4, 6, 9, 13, 18, 24, 32):
        [[1], [1, 3], [1, 1, 2, 5], [5, 11], [36], [81], [169], [324], [576], [1024]],
    (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64):
        [[1], [1, 3], [1, 1, 2, 5], [3, 5, 8], [25], [49], [81], [144], [256], [441], [729], [1296], [2304],
         [4096]],
}  # fmt: skip

ROW_FIELDS = (
    "model", "preset", "res", "batch", "precision", "backend", "L", "params_m", "ms", "images_per_s",
    "peak_gb", "first_s", "times_ms", "deterministic", "tf_rel_diff", "check_ok", "refine_passes",
    "mask_schedule", "overrides",
)  # fmt: skip

# Relative max |logit difference| allowed between the sampling path and teacher forcing.
TF_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}


def _parse(argv: list[str]) -> dict[str, Any]:
    import yaml

    opts = dict(DEFAULTS)
    for item in argv:
        if "=" not in item:
            raise SystemExit(f"bench sample: expected key=value, got {item!r}; keys: {sorted(DEFAULTS)}")
        k, v = item.split("=", 1)
        if k not in DEFAULTS:
            raise SystemExit(f"bench sample: unknown key {k!r}; keys: {sorted(DEFAULTS)}")
        opts[k] = yaml.safe_load(v) if not isinstance(DEFAULTS[k], str) else v
    if opts["precision"] not in TF_TOLERANCE:
        raise SystemExit(f"bench sample: precision: expected bf16, fp16 or fp32, got {opts['precision']!r}")
    if opts["schedule"] not in ("preset", "official_bench"):
        raise SystemExit(
            f"bench sample: schedule: expected preset or official_bench, got {opts['schedule']!r}"
        )
    if int(opts["reps"]) < 1:
        raise SystemExit(f"bench sample: reps: expected an integer >= 1, got {opts['reps']!r}")
    return opts


def parse_cases(spec: str) -> list[tuple[int, int]]:
    """``"256x64,1024x8"`` -> [(256, 64), (1024, 8)] (resolution x batch)."""
    out = []
    for item in (s.strip() for s in str(spec).split(",") if s.strip()):
        try:
            res, batch = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(
                f"bench sample: cases: expected RESxBATCH items such as 256x64, got {item!r}"
            ) from None
        if res < 1 or batch < 1:
            raise SystemExit(f"bench sample: cases: resolution and batch must be >= 1, got {item!r}")
        out.append((res, batch))
    return out


def case_overrides(preset: str, res: int, hmar_stage: int) -> list[str]:
    """Overrides for ``res`` (official patch_nums where it differs from the preset's) and HMAR's stage."""
    from maskar.tokenizers.vqvae import PATCH_NUMS

    base = load_config(preset)
    over = []
    if base.model.arch == "hmar" and int(hmar_stage) != base.model.stage:
        over.append(f"model.stage={int(hmar_stage)}")
    if int(base.model.tokenizer.resolution) != res:
        if res not in PATCH_NUMS:
            raise SystemExit(
                f"bench sample: preset {preset} is {base.model.tokenizer.resolution} px; other resolutions "
                f"need an official patch schedule ({sorted(PATCH_NUMS)}), got {res}"
            )
        pn = ",".join(str(p) for p in PATCH_NUMS[res])
        over += [
            f"model.tokenizer.resolution={res}",
            f"model.tokenizer.patch_nums=[{pn}]",
            f"data.resolution={res}",
        ]
    return over


def build_case(preset: str, overrides: list[str], device: torch.device, backend: str):
    """(model in eval mode on ``device`` with random official-init weights, resolved config)."""
    from maskar.nn.attention import set_backend
    from maskar.registry import build_model

    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU directly (d16 + VQ-VAE)
        model = build_model(cfg.model)
    model = model.to(device).eval()
    set_backend(model, backend)
    return model, cfg


def sampling_knobs(model, cfg, opts: dict[str, Any]) -> dict[str, Any]:
    """The preset's sample config with the options' cfg / top_k / top_p and the chosen mask schedule."""
    knobs = sampling_kwargs(cfg.sample)
    knobs.pop("seed", None)
    knobs.update(cfg=float(opts["cfg"]), top_k=int(opts["top_k"]), top_p=float(opts["top_p"]))
    if "mask_schedule" in knobs and opts["schedule"] == "official_bench":
        table = OFFICIAL_BENCH_SCHEDULES.get(tuple(model.patch_nums))
        if table is None:
            raise SystemExit(
                f"bench sample: schedule=official_bench has no table for patch_nums {list(model.patch_nums)}"
            )
        knobs["mask_schedule"] = [list(s) for s in table]
    return knobs


def generate_with_tokens(model, labels: torch.Tensor, seed: int, knobs: dict[str, Any]):
    """What ``model.generate`` does, also returning the final token ids of every scale.

    Returns images (B, C, H, W) and a list of (B, pn^2) int64 tensors.
    """
    knobs = dict(knobs)
    core = {k: knobs.pop(k) for k in ("cfg", "cfg_schedule", "temperature", "top_k", "top_p")}
    labels = model._check_labels(labels)
    args = model._sampling_args(
        core["cfg"],
        core["cfg_schedule"],
        core["temperature"],
        core["top_k"],
        core["top_p"],
        seed,
        labels.device,
    )
    tokens: list[torch.Tensor] = []
    images = model._autoregress(
        labels, args, out_indices=tokens, **model._refine_options(knobs, editing=False)
    )
    return images, tokens


def teacher_forced_rel_diff(model, labels, tokens, knobs: dict[str, Any], autocast) -> float:
    """max |sampling-path logits - teacher-forced logits| / max |teacher-forced logits| on 2 samples."""
    from maskar.models.var import no_autocast

    n = min(2, labels.shape[0])
    gt = [t[:n] for t in tokens]
    keep = [torch.ones_like(t, dtype=torch.bool) for t in gt]  # force every sampled token
    lab = labels[:n]
    with torch.no_grad():
        with no_autocast(lab.device):
            x_in = model.tokenizer.teacher_forcing_input(gt).float()  # (n, L-1, Cz)
        with autocast:
            want = model(lab, x_in).float()  # (n, L, V)
            args = model._sampling_args(
                knobs["cfg"], knobs["cfg_schedule"], knobs["temperature"], knobs["top_k"], knobs["top_p"], 0,
                lab.device,
            )  # fmt: skip
            collected: list[torch.Tensor] = []
            model._autoregress(lab, args, gt, keep, collect=collected)
    got = torch.cat(collected, dim=1)
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolved_schedule(knobs: dict[str, Any], model) -> list[list[int]] | None:
    """The mask schedule HMAR will refine with (None for VAR or when refinement is off)."""
    if (
        "mask_schedule" not in knobs
        or not getattr(model, "has_mask_head", False)
        or knobs.get("refine") is False
    ):
        return None
    return model._refine_options({"mask_schedule": knobs["mask_schedule"]}, editing=False)["schedule"]


def refine_passes(schedule: list[list[int]] | None, patch_nums) -> int:
    """Refinement forward passes per generation: one per schedule entry after the first (pn > 1)."""
    if schedule is None:
        return 0
    return sum(len(s) - 1 for s, pn in zip(schedule, patch_nums) if pn > 1)


def run_case(preset: str, res: int, batch: int, opts: dict[str, Any], device: torch.device):
    """Check then time one (preset, resolution, batch). Returns (row dict, images of the last timed call)."""
    overrides = case_overrides(preset, res, int(opts["hmar_stage"]))
    model, cfg = build_case(preset, overrides, device, str(opts["backend"]))
    knobs = sampling_knobs(model, cfg, opts)
    precision, seed = str(opts["precision"]), int(opts["seed"])
    labels = torch.arange(batch, device=device) % model.num_classes  # (B,) int64

    def public_call() -> torch.Tensor:
        with torch.no_grad(), autocast_for(device, precision):
            return model.generate(labels, seed=seed, **knobs)

    def checked_call():
        with torch.no_grad(), autocast_for(device, precision):
            return generate_with_tokens(model, labels, seed, knobs)

    _sync(device)
    t0 = time.perf_counter()
    img_a, tok_a = checked_call()
    _sync(device)
    first_s = time.perf_counter() - t0
    img_b, tok_b = checked_call()  # determinism repeat, doubles as a warm-up
    deterministic = all(torch.equal(a, b) for a, b in zip(tok_a, tok_b)) and torch.equal(img_a, img_b)
    finite = bool(torch.isfinite(img_a).all()) and img_a.min().item() >= -1.0 and img_a.max().item() <= 1.0
    in_vocab = all(int(t.min()) >= 0 and int(t.max()) < model.vocab_size for t in tok_a)
    shape_ok = tuple(img_a.shape) == (batch, model.image_channels, model.image_size, model.image_size)
    tf = None
    if opts["check"]:
        tf = teacher_forced_rel_diff(model, labels, tok_a, knobs, autocast_for(device, precision))
    del img_b, tok_b
    for _ in range(int(opts["warmup"])):
        public_call()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    out = img_a
    for _ in range(int(opts["reps"])):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = public_call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            out = public_call()
            times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    same_as_public = torch.equal(out, img_a)  # the timed path produced the checked images
    tf_ok = tf is None or tf <= TF_TOLERANCE[precision]
    check_ok = deterministic and finite and in_vocab and shape_ok and same_as_public and tf_ok

    ms = statistics.median(times)
    schedule = resolved_schedule(knobs, model)
    arch = cfg.model.arch
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tokenizer.")) / 1e6
    row = {
        "model": f"{arch}-d{model.depth}", "preset": preset, "res": int(model.image_size), "batch": batch,
        "precision": precision, "backend": str(opts["backend"]), "L": int(model.L),
        "params_m": round(n_params, 1), "ms": ms, "images_per_s": batch / (ms / 1e3), "peak_gb": peak,
        "first_s": first_s, "times_ms": times,
        "deterministic": deterministic, "tf_rel_diff": tf, "check_ok": check_ok,
        "refine_passes": refine_passes(schedule, model.patch_nums), "mask_schedule": schedule,
        "overrides": overrides,
    }  # fmt: skip
    if not check_ok:
        row["check_failures"] = [
            name for name, ok in [
                ("determinism", deterministic), ("finite/range", finite), ("token ids", in_vocab),
                ("image shape", shape_ok), ("public generate == checked run", same_as_public),
                (f"teacher forcing (rel diff {tf} > {TF_TOLERANCE[precision]})", tf_ok),
            ] if not ok
        ]  # fmt: skip
    return row, out


def _fmt(v, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def format_row(r: dict[str, Any]) -> str:
    check = "ok" if r["check_ok"] else "FAIL"
    return (
        f"{r['model']:<9} {r['res']:>5} {r['batch']:>5} {r['precision']:>5} {r['L']:>5} "
        f"{r['params_m']:>7.1f}M "
        f"{r['ms']:>9.1f} {r['images_per_s']:>7.1f} {_fmt(r['peak_gb'], '.2f', 7)} {r['first_s']:>7.2f} "
        f"{r['refine_passes']:>6} {_fmt(r['tf_rel_diff'], '.1e', 8)} {check:>5}"
    )


HEADER = (
    f"{'model':<9} {'res':>5} {'batch':>5} {'prec':>5} {'L':>5} {'params':>8} {'ms/batch':>9} {'img/s':>7} "
    f"{'peak GB':>7} {'first s':>7} {'refine':>6} {'tf diff':>8} {'check':>5}"
)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    opts = _parse(argv)
    dev_name = opts["device"]
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev_name)
    if device.type == "cuda" and opts["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"command: maskar bench sample {' '.join(argv)}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {gpu} | torch {torch.__version__} | cuda {torch.version.cuda or '-'} | "
        f"tf32 matmul {torch.backends.cuda.matmul.allow_tf32} cudnn {torch.backends.cudnn.allow_tf32}"
    )
    print(
        f"precision {opts['precision']} (tokenizer fp32), backend {opts['backend']}, cfg {opts['cfg']}, "
        f"top_k {opts['top_k']}, top_p {opts['top_p']}, HMAR stage {opts['hmar_stage']}, "
        f"schedule {opts['schedule']}, "
        f"median of {opts['reps']} after the determinism repeat + {opts['warmup']} warm-up"
    )
    print(HEADER)
    print("-" * len(HEADER))
    rows, failed = [], False
    for preset in [m.strip() for m in str(opts["models"]).split(",") if m.strip()]:
        for res, batch in parse_cases(opts["cases"]):
            try:
                row, _ = run_case(preset, res, batch, opts, device)
            except (RuntimeError, ValueError) as e:  # e.g. out of memory: report, go on with the next case
                failed = True
                msg = str(e).splitlines()[0][:140] if str(e) else ""
                print(f"{preset:<9} {res:>5} {batch:>5} failed: {type(e).__name__}: {msg}", flush=True)
                row = None
            if device.type == "cuda":  # the case's model is gone (also after an exception): free its memory
                gc.collect()
                torch.cuda.empty_cache()
            if row is None:
                continue
            row.update(device=gpu, torch=torch.__version__)
            rows.append(row)
            failed |= not row["check_ok"]
            if opts["json"]:  # rewritten after every case, so a run cut short keeps its rows
                with open(opts["json"], "w") as f:
                    json.dump(rows, f, indent=1)
            print(format_row(row), flush=True)
            if not row["check_ok"]:
                print(f"  check failed: {'; '.join(row['check_failures'])}")
    for r in rows:
        if r["refine_passes"] or r["overrides"]:
            print(
                f"  {r['model']} {r['res']} px: overrides {r['overrides']}; "
                f"mask schedule {r['mask_schedule']}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
