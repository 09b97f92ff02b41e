"""The official implementations as peers: their own code, timed on this machine in the same run as ours.

    python benchmarks/peers.py --peers-dir .carry/peers                     # every case, full sizes
    python benchmarks/peers.py --cases hmar-train-256,mar-b-64 --json out.json
    python benchmarks/peers.py --tiny                                       # small configs: a dry run
    python benchmarks/peers.py --list

The official code is not part of this repository (HMAR is under a non-commercial licence, CASMAR has
none). ``scripts/extract_peers.sh`` copies the needed files of each official repository, at a pinned
commit, into ``--peers-dir`` (one folder per release: hmar, var, mar, casmar_v1, casmar_v2); this
script imports them from there, builds the models at the official sizes with random weights and
times the official code paths:

- training (``*-train-*``): fwd + bwd of the logits as the official ``benchmark/training.py`` does it
  (fp16 autocast, random teacher-forcing input, random fp16 upstream gradient, no optimizer), then a
  full step as the official trainer does it (fp16 autocast, cross-entropy with a (1, L) per-token
  weight, the official ``AmpOptimizer``: GradScaler, grad clip 2.0, fused AdamW betas (0.9, 0.95)).
  VAR = ``VAR.forward`` (block-causal mask, SDPA), HMAR = ``NextScalePrediction.forward``
  (block-diagonal mask, SDPA, or HMAR's own Triton kernel in ``hmar-kernel-*``).
- sampling (``*-sample-*``): one class-conditional batch, tokens to pixels, fp32 with TF32 matmuls as
  the official arguments set it: ``HMAR.generate`` (``hmar``: mask refinement, no KV cache;
  ``hmar-varmode``: the KV-cache mode the official benchmark uses as "VAR") and VAR's
  ``autoregressive_infer_cfg``; cfg 1.5, top_k 900, top_p 0.96.
- MAR-B ``sample_tokens`` (fp16 autocast, cfg 2.9 linear, 100 diffusion steps; tokens only) and
  CASMAR-B ``sample_tokens`` at its README evaluation settings (num_iter 4, cfg 2.5, re_cfg 2.7; tokens
  only), for each CASMAR release.

Each case runs in a worker process (one per official repository: their ``models`` packages clash and
their builders patch ``torch.nn`` globally), under a wall-clock cap; a failing case is reported with
the exception and the line of the official file that raised it, and the run goes on. Times are CUDA
events around each call (wall clock on CPU), median of the timed calls after the warm-up calls;
fewer timed calls are made where the next would pass the case's cap (``n`` says how many ran).
Peak memory = ``torch.cuda.max_memory_allocated`` over the timed calls, weights included, GB = 1e9 B.

On a machine without CUDA the official code's hard-coded ``.cuda()`` / ``device="cuda"`` are sent to
the CPU by a TorchFunctionMode, and HMAR's Triton kernel runs under ``TRITON_INTERPRET=1``; this is
for ``--tiny`` dry runs only.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import importlib.util
import json
import os
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

MARK = "@@peers "
HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = ("hmar", "var", "mar", "casmar_v2", "casmar_v1")
EXIT_USAGE = 2


# ----------------------------------------------------------------------------------------------
# The cases (parent side)


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # folder under --peers-dir holding the official code
    kind: str  # train | sample | mar | casmar
    what: str  # one line for the table
    params: dict[str, Any] = field(default_factory=dict)
    warmup: int = 1
    reps: int = 3
    cap_s: float = 60.0  # wall-clock cap of the whole case (build, warm-up, timed calls)


def _cases() -> list[Case]:
    """Every case, in the order they run (most wanted first, so a --budget-s cuts the least wanted)."""
    mar = {"batch": 64, "cfg": 2.9, "cfg_schedule": "linear", "temperature": 1.0}
    cas = {"batch": 64, "num_iter": 4, "cfg": 2.5, "re_cfg": 2.7, "cfg_schedule": "linear",
           "temperature": 1.0}
    cas_what = "sample_tokens, README eval settings"

    def train(group: str, res: int, batch: int, attn: str, cap: float) -> Case:
        name = {"var": "var", "hmar": "hmar" if attn == "sdpa" else "hmar-kernel"}[group]
        what = {"var": "VAR-d16, block-causal SDPA", "hmar": "HMAR-d16, block-diag SDPA"}[group]
        if attn == "triton":
            what = "HMAR-d16, HMAR's Triton block-sparse kernel"
        return Case(f"{name}-train-{res}", group, "train", f"{what}, train {res}px B{batch}",
                    {"res": res, "batch": batch, "depth": 16, "attn": attn}, warmup=2, reps=4, cap_s=cap)

    def sample(mode: str, res: int, batch: int, reps: int, cap: float) -> Case:
        what = {"hmar": "HMAR.generate, mask refinement", "hmar-varmode": "HMAR.generate, KV-cache mode "
                "(the official benchmark's 'VAR')", "var": "VAR.autoregressive_infer_cfg"}[mode]
        return Case(f"{mode}-sample-{res}", "var" if mode == "var" else "hmar", "sample",
                    f"{what}, {res}px B{batch}",
                    {"res": res, "batch": batch, "depth": 16, "cfg": 1.5, "top_k": 900, "top_p": 0.96,
                     "mode": mode}, warmup=1, reps=reps, cap_s=cap)

    # VAR / HMAR first: ten cases in about 80 s on an H200, the figures the docs cite most. On
    # 2026-12-04 the masked cases ran first and spent the standard set's budget (CASMAR v2 alone
    # passed a 120 s cap), so no VAR / HMAR case ran in that call.
    out = [train("hmar", 256, 32, "sdpa", 40.0), sample("hmar", 256, 64, 3, 30.0),
            sample("hmar-varmode", 256, 64, 3, 30.0), train("hmar", 1024, 2, "sdpa", 45.0),
            sample("hmar", 1024, 8, 1, 45.0), sample("hmar-varmode", 1024, 8, 1, 45.0),
            train("var", 256, 32, "sdpa", 40.0), sample("var", 256, 64, 3, 30.0),
            train("var", 1024, 2, "sdpa", 45.0), sample("var", 1024, 8, 1, 45.0),
            Case("mar-b-64", "mar", "mar", "MAR-B sample_tokens num_iter 64 B64 cfg 2.9, fp16",
                 {**mar, "num_iter": 64}, warmup=0, reps=1, cap_s=75.0),
            Case("casmar-b-v1", "casmar_v1", "casmar", f"CASMAR-B v1 (PSA) {cas_what}",
                 dict(cas), warmup=0, reps=1, cap_s=60.0),
            train("hmar", 256, 32, "triton", 75.0), train("hmar", 1024, 2, "triton", 75.0)]
    # The long cases, outside the standard set: each takes minutes of the official code.
    out += [Case("casmar-b-v2", "casmar_v2", "casmar", f"CASMAR-B v2 (SALA) {cas_what}",
                 dict(cas), warmup=0, reps=1, cap_s=330.0),
            Case("mar-b-256", "mar", "mar", "MAR-B sample_tokens num_iter 256 B64 cfg 2.9, fp16",
                 {**mar, "num_iter": 256}, warmup=0, reps=1, cap_s=240.0)]
    return out


CASES = {c.name: c for c in _cases()}
ALIASES = {
    "all": list(CASES),
    "standard": [n for n in CASES if n not in ("casmar-b-v2", "mar-b-256")],  # scripts/gpu/bench_peers.sh
    "long": ["casmar-b-v2", "mar-b-256"],  # minutes each: a device call of their own
    "train": [n for n, c in CASES.items() if c.kind == "train"],
    "sample": [n for n, c in CASES.items() if c.kind == "sample"],
    "mar": [n for n, c in CASES.items() if c.kind == "mar"],
    "casmar": [n for n, c in CASES.items() if c.kind == "casmar"],
}
# Releases that can share a worker process: same global side effects (the VAR/HMAR builders both make
# torch.nn's reset_parameters a no-op), clashing module names swapped out between cases.
FAMILY = {"var": "var-hmar", "hmar": "var-hmar", "mar": "mar-casmar", "casmar_v1": "mar-casmar",
          "casmar_v2": "mar-casmar"}
OWN_MODULES = ("models", "diffusion", "dist", "utils", "attn")


def select_cases(spec: str) -> list[Case]:
    """Comma-separated names, aliases (all, train, sample, mar, casmar) or globs; exit 2 on no match."""
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        hits = ALIASES.get(item) or [n for n in CASES if fnmatch.fnmatchcase(n, item)]
        if not hits:
            print(f"peers: --cases: {item!r} matches no case; cases: {', '.join(CASES)}; "
                  f"aliases: {', '.join(ALIASES)}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE)
        names += [n for n in hits if n not in names]
    if not names:
        print("peers: --cases: expected at least one case name", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    return [c for c in CASES.values() if c.name in names]  # in run order


def _schedules(patch_nums: tuple[int, ...], which: str) -> list[list[int]]:
    from maskar.bench.sample import OFFICIAL_BENCH_SCHEDULES
    from maskar.models.hmar import default_mask_schedule

    if which == "official_bench":
        return [list(s) for s in OFFICIAL_BENCH_SCHEDULES[tuple(patch_nums)]]
    return default_mask_schedule(tuple(patch_nums))


def build_spec(case: Case, tiny: bool, schedule: str, cap_s: float = 0.0) -> dict[str, Any]:
    """Everything a worker needs for one case, resolved here (patch_nums, mask schedule, tiny sizes)."""
    from maskar.tokenizers.vqvae import PATCH_NUMS

    p = dict(case.params)
    spec = {"name": case.name, "group": case.group, "kind": case.kind, "what": case.what,
            "warmup": case.warmup, "reps": case.reps, "cap_s": case.cap_s, "tiny": tiny}
    if case.kind in ("train", "sample"):
        p["patch_nums"] = list(PATCH_NUMS[p["res"]])
        p.update(vae_ch=160, n_layers_train=8)
        if tiny:
            # 2 blocks of width 128 (head dim 64 as the real model), 3 or 4 scales, a narrow VQ-VAE.
            p.update(depth=2, batch=2, vae_ch=32, n_layers_train=1,
                     patch_nums=[1, 2, 3] if p["res"] == 256 else [1, 2, 3, 4])
        if case.kind == "sample" and p["mode"] == "hmar":
            p["mask_schedule"] = _schedules(tuple(p["patch_nums"]), schedule)
            p["schedule_name"] = schedule
    elif case.kind == "mar":
        p["arch"] = "mar_base"
        if tiny:
            p.update(batch=2, num_iter={64: 4, 256: 8}[p["num_iter"]], arch="tiny")
    elif case.kind == "casmar":
        p["arch"] = "casmar_base"
        if tiny:
            p.update(batch=2, num_iter=1, arch="tiny")
    if tiny:
        spec.update(warmup=min(case.warmup, 1), reps=min(case.reps, 2), cap_s=max(case.cap_s, 120.0),
                    what=f"tiny stand-in for: {case.what}")
    if cap_s > 0:
        spec["cap_s"] = cap_s
    spec["params"] = p
    return spec


# ----------------------------------------------------------------------------------------------
# Running the workers (parent side)


@dataclass
class Outcome:
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)


def _fail(spec: dict[str, Any], status: str, error: str, wall_s: float = 0.0) -> dict[str, Any]:
    return {"case": spec["name"], "what": spec["what"], "status": status, "error": error, "wall_s": wall_s}


def _reader(stream, q: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        q.put(line)
    q.put(None)


def run_worker(family: str, specs: list[dict[str, Any]], args, log, outcome: Outcome,
               budget_end: float) -> None:
    """Runs ``specs`` in worker processes, restarting one after a crash or a cap; fills ``outcome``."""
    pending = []
    for s in specs:
        folder = os.path.join(args.peers_dir, s["group"])
        if os.path.isdir(folder):
            pending.append(s)
        else:
            outcome.results[s["name"]] = _fail(
                s, "fail", f"{folder} not found: run scripts/extract_peers.sh to extract the official code")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    while pending:
        if time.monotonic() >= budget_end:
            for s in pending:
                outcome.results[s["name"]] = _fail(s, "skipped", f"--budget-s {args.budget_s:g} spent")
            return
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(pending, f)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", family, "--worker-specs", f.name,
               "--peers-dir", args.peers_dir, "--device", args.device]
        print(f"[peers] worker {family}: {', '.join(s['name'] for s in pending)}", file=log, flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        q: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
        current, deadline, started, tail = None, budget_end, time.monotonic(), []
        killed_for, progressed = "", False
        while True:
            try:
                line = q.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line.startswith(MARK):
                ev = json.loads(line[len(MARK):])
                if ev["event"] == "env":
                    outcome.env.setdefault("workers", {})[family] = ev["env"]
                elif ev["event"] == "start":
                    current = next(s for s in pending if s["name"] == ev["case"])
                    started, tail = time.monotonic(), []
                    deadline = min(started + current["cap_s"], budget_end)
                elif ev["event"] == "result":
                    r = ev["result"]
                    outcome.results[r["case"]] = r
                    pending = [s for s in pending if s["name"] != r["case"]]
                    print(f"[peers] {format_row(r)}", file=log, flush=True)
                    current, deadline, progressed = None, budget_end, True
            elif line:
                log.write(line)
                log.flush()
                tail = (tail + [line.rstrip()])[-12:]
            if time.monotonic() > deadline and proc.poll() is None:
                killed_for = "cap" if current is not None and deadline < budget_end else "budget"
                os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        os.unlink(f.name)
        if current is not None and current["name"] in {s["name"] for s in pending}:
            wall = time.monotonic() - started
            if killed_for == "cap":
                r = _fail(current, "timeout", f"passed its cap of {current['cap_s']:g} s", wall)
            elif killed_for == "budget":
                r = _fail(current, "skipped", f"stopped: --budget-s {args.budget_s:g} spent", wall)
            else:
                last = " | ".join(tail[-4:])
                r = _fail(current, "fail", f"worker died (exit {rc}); last output: {last}", wall)
            outcome.results[current["name"]] = r
            print(f"[peers] {format_row(r)}", file=log, flush=True)
            pending = [s for s in pending if s["name"] != current["name"]]
        elif pending and not progressed:
            for s in pending:  # ended before finishing any case: imports or CUDA initialisation
                outcome.results[s["name"]] = _fail(
                    s, "fail", f"worker exited {rc} before the case started: " + " | ".join(tail[-4:]))
            return


# ----------------------------------------------------------------------------------------------
# The table


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_row(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['case']:<26} {r['status'].upper()}: {r.get('error', '')}"
    other = ""
    if "step_ms" in r:
        other = f"step {_f(r.get('step_ms'), '.1f')} ms ({_f(r.get('step_peak_gb'), '.1f')} GB)"
    elif "images_per_s" in r:
        other = f"{r['images_per_s']:.2f} img/s"
    return (f"{r['case']:<26} {_f(r.get('ms'), '10.1f')} ms  {other:<26} "
            f"peak {_f(r.get('peak_gb'), '6.1f')} GB  n={r.get('n', 0)}  ({r.get('wall_s', 0):.0f} s)")


def print_table(outcome: Outcome, cases: list[Case], out) -> None:
    print("\n| case | peer | what | median ms | step ms (with AdamW) | img/s | peak GB | n | status |",
          file=out)
    print("|---|---|---|---|---|---|---|---|---|", file=out)
    for c in cases:
        r = outcome.results.get(c.name) or {"status": "missing", "error": "no result"}
        src = outcome.env.get("sources", {}).get(c.group, "")
        st = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}".replace("|", "/")
        print(f"| {c.name} | {src} | {r.get('what', c.what)} | {_f(r.get('ms'), '.1f')} | "
              f"{_f(r.get('step_ms'), '.1f')} | {_f(r.get('images_per_s'), '.2f')} | "
              f"{_f(r.get('peak_gb'), '.1f')} | {r.get('n', 0)} | {st} |", file=out)


def _sources(peers_dir: str) -> dict[str, str]:
    out = {}
    for g in GROUPS:
        path = os.path.join(peers_dir, g, "SOURCE")
        if os.path.isfile(path):
            repo, commit = open(path).read().split()[:2]
            out[g] = f"{repo}@{commit[:7]}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--peers-dir", default=".carry/peers", help="folder holding the extracted official code")
    ap.add_argument("--cases", default="all", help="comma-separated names, aliases or globs (see --list)")
    ap.add_argument("--tiny", action="store_true", help="small configs: check that every case runs")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--schedule", default="default", choices=("default", "official_bench"),
                    help="HMAR mask schedule: refine the 2x2 and 3x3 scales (the official 256 px default, "
                         "same rule at 1024 px) or the official benchmark/inference.py tables")
    ap.add_argument("--cap-s", type=float, default=0.0, help="every case's wall-clock cap in seconds "
                    "(0 = each case's own, see --list)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop starting or running cases after this "
                    "many seconds in all (0 = no budget)")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--log", default="", help="write the workers' own output here (default: stderr)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker-specs", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        return worker_main(args.worker, args.worker_specs, args.peers_dir, args.device)
    if args.list:
        for c in CASES.values():
            print(f"{c.name:<26} [{c.group}] {c.what}  (warm-up {c.warmup}, timed {c.reps}, "
                  f"cap {c.cap_s:g} s)")
        print(f"aliases: {', '.join(ALIASES)}")
        return 0
    cases = select_cases(args.cases)
    if not os.path.isdir(args.peers_dir):
        print(f"peers: --peers-dir: {args.peers_dir!r} is not a folder; extract the official code first "
              f"(scripts/extract_peers.sh)", file=sys.stderr)
        return EXIT_USAGE
    for flag, v in (("--budget-s", args.budget_s), ("--cap-s", args.cap_s)):
        if v < 0:
            print(f"peers: {flag}: expected a number >= 0, got {v:g}", file=sys.stderr)
            return EXIT_USAGE
    if importlib.util.find_spec("maskar") is None:  # run as a script from the checkout
        sys.path.insert(0, os.path.dirname(HERE))
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        print("peers: --device cuda: CUDA is not available here", file=sys.stderr)
        return EXIT_USAGE
    args.peers_dir = os.path.abspath(args.peers_dir)
    specs = [build_spec(c, args.tiny, args.schedule, args.cap_s) for c in cases]
    outcome = Outcome(env={"sources": _sources(args.peers_dir), "command": shlex.join(sys.argv),
                           "device": args.device, "tiny": args.tiny})
    t0 = time.monotonic()
    budget_end = t0 + args.budget_s if args.budget_s > 0 else float("inf")
    with open(args.log, "w") if args.log else contextlib.nullcontext(sys.stderr) as log:
        chunk: list[dict[str, Any]] = []
        for spec in specs + [None]:  # consecutive cases of one family share a worker
            if chunk and (spec is None or FAMILY[spec["group"]] != FAMILY[chunk[0]["group"]]):
                run_worker(FAMILY[chunk[0]["group"]], chunk, args, log, outcome, budget_end)
                chunk = []
            if spec is not None:
                chunk.append(spec)
    outcome.env["wall_s"] = round(time.monotonic() - t0, 1)

    print(f"# peers: {outcome.env['command']}")
    for g, src in outcome.env["sources"].items():
        print(f"# {g}: {src}")
    for fam, e in outcome.env.get("workers", {}).items():
        print(f"# worker {fam}: {e}")
    for c in cases:
        r = outcome.results.get(c.name) or _fail({"name": c.name, "what": c.what}, "missing", "no result")
        print(format_row(r))
    print_table(outcome, cases, sys.stdout)
    print(f"\n{len(cases)} cases in {outcome.env['wall_s']:.0f} s; "
          f"{sum(r['status'] == 'ok' for r in outcome.results.values())} ok")
    if args.json:
        with open(args.json, "w") as f:
            rows = [outcome.results.get(c.name) for c in cases]
            json.dump({"env": outcome.env, "results": rows}, f, indent=1)
    return 0


# ----------------------------------------------------------------------------------------------
# Worker side: imports the official code of one repository and runs its cases


def _emit(event: str, **kw) -> None:
    print(MARK + json.dumps({"event": event, **kw}), flush=True)


def cuda_to_cpu_mode():
    """TorchFunctionMode sending the official code's hard-coded CUDA placements to the CPU (dry runs only)."""
    import torch
    from torch.overrides import TorchFunctionMode

    def is_cuda(d) -> bool:
        if isinstance(d, torch.device):
            return d.type == "cuda"
        return isinstance(d, str) and d.startswith("cuda")

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.Tensor.cuda:
                return args[0]
            if is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            if func is torch.Tensor.to:
                args = tuple("cpu" if is_cuda(a) else a for a in args)
            return func(*args, **kwargs)

    return CudaToCpu()


class Env:
    """Device plumbing for one worker: sync, timing, autocast, peak memory."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.dev = torch.device(device)
        self.cuda = self.dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def autocast_fp16(self):
        if self.cuda:
            return self.torch.autocast("cuda", dtype=self.torch.float16)
        return contextlib.nullcontext()  # fp32 on the CPU dry run

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None

    def time_calls(self, fn, warmup: int, reps: int, deadline: float) -> list[float]:
        """ms of up to ``reps`` calls after ``warmup`` calls; stops where the next would pass ``deadline``."""
        for _ in range(warmup):
            fn()
        self.sync()
        self.reset_peak()
        times: list[float] = []
        for _ in range(reps):
            if self.cuda:
                start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            if time.monotonic() + times[-1] / 1e3 > deadline:
                break
        return times

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def _official_env(env: Env, group: str) -> None:
    """The global settings the official entry points make before building their models."""
    import random

    import numpy as np

    torch = env.torch
    if group in ("hmar", "var"):  # utils/arg_util.py: tf32 on; cudnn benchmark, deterministic, seed 42
        if env.cuda:
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = True
        seed = 42
    else:  # main_mar.py / main_casmar.py: cudnn benchmark, seed 1
        torch.backends.cudnn.benchmark = True
        seed = 1
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def activate_release(group: str, peers_dir: str) -> None:
    """Makes ``import models`` (etc.) import the official code of ``group``: its folder first on sys.path,
    the modules of the release imported before dropped; stands in for HMAR's one import of utils/misc.py."""
    import types

    for name in [n for n in sys.modules if n.split(".")[0] in OWN_MODULES]:
        del sys.modules[name]
    folders = {os.path.join(peers_dir, g) for g in GROUPS}
    keep = [p for p in sys.path if p not in folders and os.path.abspath(p or ".") != HERE]
    sys.path[:] = [os.path.join(peers_dir, group)] + keep
    if group == "hmar":
        # models/hmar.py and mp.py import only does_not_contain_substrings from utils/misc.py, which
        # itself imports wandb, pytz and the training arguments; the function is a one-line test.
        misc = types.ModuleType("utils.misc")
        misc.does_not_contain_substrings = lambda s, subs: all(x not in s for x in subs)
        sys.modules["utils.misc"] = misc


def ensure_torchvision() -> None:
    """timm (MAR, CASMAR) imports torchvision at import time; where it is missing (a CPU-only torch has
    no matching wheel on PyPI) timm gets a stand-in, for dry runs only."""
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.abc
    import importlib.machinery
    from unittest import mock

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            m = mock.MagicMock(name=spec.name)
            m.__path__, m.__spec__, m.__name__ = [], spec, spec.name
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())
    print("[peers] torchvision missing: timm gets a stand-in (CPU dry run only)", flush=True)


def _where(exc: BaseException, peers_dir: str) -> str:
    """The innermost frame of the official code (else the innermost frame) as file:line."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if f.filename.startswith(peers_dir)] or frames
    if not inside:
        return ""
    f = inside[-1]
    return f"{os.path.relpath(f.filename, peers_dir)}:{f.lineno} `{(f.line or '').strip()}`"


def _randomize(*modules) -> None:
    """Uniform [0, 1) weights, as the official benchmark/inference.py does (its init gives NaNs otherwise)."""
    import torch

    for m in modules:
        for p in m.parameters():
            p.data = torch.rand_like(p.data)


# --- VAR / HMAR --------------------------------------------------------------------------------


def _build_var_family(p: dict[str, Any], env: Env, group: str, purpose: str, attn: str = "sdpa"):
    """Official builders with the official arguments (utils/arg_util.py defaults, d16 recipe)."""
    import models

    kw = dict(device=env.dev, patch_nums=tuple(p["patch_nums"]), V=4096, Cvae=32, ch=p["vae_ch"],
              share_quant_resi=4, num_classes=1000, depth=p["depth"], shared_aln=False, attn_l2_norm=True,
              flash_if_available=True, fused_if_available=True)
    train_init = dict(init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02, init_std=-1)
    if group == "var":
        return models.build_vae_var(**kw, **train_init)
    if purpose == "train":
        return models.build_vae_nsp(**kw, **train_init, using_block_sparse_attn=(attn == "triton"))
    return models.build_vae_hmar(**kw, n_layers_train=p["n_layers_train"])


def run_train(spec: dict[str, Any], env: Env, group: str, deadline: float) -> dict[str, Any]:
    torch = env.torch
    p = spec["params"]
    _, model = _build_var_family(p, env, group, "train", p["attn"])
    B, L, V = p["batch"], sum(n * n for n in p["patch_nums"]), 4096
    nparams = sum(q.numel() for q in model.parameters())
    # benchmark/training.py: random fp16 teacher-forcing input and upstream gradient, fp16 autocast
    labels = torch.randint(0, 1000, (B,), device=env.dev)
    x = torch.randn(B, L - 1, 32, device=env.dev, dtype=torch.float16, requires_grad=True)
    do = torch.rand(B, L, V, device=env.dev, dtype=torch.float16)

    def fwd_bwd():
        with env.autocast_fp16():
            model(labels, x).backward(do, retain_graph=True)

    share = (deadline - time.monotonic()) * 0.5  # half of what is left for each of the two timings
    t_fb = env.time_calls(fwd_bwd, spec["warmup"], spec["reps"], time.monotonic() + share)
    peak_fb = env.peak_gb()
    do = None  # frees the upstream gradient before the step is timed
    model.zero_grad(set_to_none=True)
    x.grad = None

    # The official trainer's step: amp_ctx forward + CE with per-token weights, AmpOptimizer (GradScaler,
    # clip 2.0, fused AdamW (0.9, 0.95)); parameter groups as utils/lr_control.filter_params splits them.
    from utils.amp_sc import AmpOptimizer

    nowd = {"cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
            "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul"}
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    nd = [q for n, q in named if q.ndim == 1 or n.endswith("bias") or any(k in n for k in nowd)]
    d = [q for n, q in named if not (q.ndim == 1 or n.endswith("bias") or any(k in n for k in nowd))]
    opt = torch.optim.AdamW([{"params": d, "weight_decay": 0.05}, {"params": nd, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), fused=env.cuda)
    amp = AmpOptimizer(mixed_precision=1 if env.cuda else 0, optimizer=opt, names=[n for n, _ in named],
                       paras=[q for _, q in named], grad_clip=2.0)
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.0, reduction="none")
    gt = torch.randint(0, V, (B, L), device=env.dev)
    lw = torch.full((1, L), 1.0 / L, device=env.dev)  # VAR's uniform weights; HMAR's lognorm: another (1, L)
    x_in = x.detach()
    scales: list[float] = []

    def step():
        with amp.amp_ctx:
            logits = model(labels, x_in)
            loss = ce(logits.view(-1, V), gt.view(-1)).view(B, -1).mul(lw).sum(dim=-1).mean()
        amp.backward_clip_step(stepping=True, loss=loss)
        if amp.scaler is not None:
            scales.append(amp.scaler.get_scale())

    t_st = env.time_calls(step, 1, max(3, spec["reps"] - 2), deadline)
    peak_st = env.peak_gb()
    skipped = sum(b < a for a, b in zip(scales, scales[1:]))  # GradScaler halves its scale on a skipped step
    out = {"ms": statistics.median(t_fb), "times_ms": t_fb, "n": len(t_fb), "peak_gb": peak_fb,
           "step_ms": statistics.median(t_st), "step_times_ms": t_st, "step_n": len(t_st),
           "step_peak_gb": peak_st, "L": L, "batch": B, "params_m": nparams / 1e6,
           "optimizer_steps_skipped_by_scaler": skipped}
    if p["attn"] == "triton":
        out["attention"] = "HMAR block_sparse_attn_func (Triton), default configs"
    return out


def run_sample(spec: dict[str, Any], env: Env, group: str, deadline: float) -> dict[str, Any]:
    torch = env.torch
    p = spec["params"]
    vae, model = _build_var_family(p, env, group, "sample")
    _randomize(vae, model)
    model.eval()
    B = p["batch"]
    knobs = dict(cfg=p["cfg"], top_k=p["top_k"], top_p=p["top_p"], more_smooth=False)
    if p["mode"] == "var":
        def call():
            return model.autoregressive_infer_cfg(B, None, **knobs)
    else:
        refine = p["mode"] == "hmar"

        def call():
            schedule = p.get("mask_schedule") if refine else None
            return model.generate(B, None, **knobs, mask=refine, mask_schedule=schedule, kv_cache=not refine)

    shapes = []

    def fn():
        img = call()
        shapes.append(tuple(img.shape))

    with torch.inference_mode():
        times = env.time_calls(fn, spec["warmup"], spec["reps"], deadline)
    ms = statistics.median(times)
    out = {"ms": ms, "times_ms": times, "n": len(times), "peak_gb": env.peak_gb(),
           "images_per_s": B / ms * 1e3, "image_shape": list(shapes[-1]), "batch": B,
           "precision": "fp32 (TF32 matmuls)" if env.cuda else "fp32",
           "params_m": sum(q.numel() for q in model.parameters()) / 1e6}
    if p["mode"] == "hmar":
        out["mask_schedule"] = p["mask_schedule"]
    return out


# --- MAR / CASMAR ------------------------------------------------------------------------------


def _build_mar(p: dict[str, Any]):
    from functools import partial

    import torch.nn as nn
    from models import mar as mar_module

    # main_mar.py defaults and the README's MAR-B evaluation flags
    kw = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, mask_ratio_min=0.7,
              label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
              diffloss_d=6, diffloss_w=1024, num_sampling_steps="100", diffusion_batch_mul=4,
              grad_checkpointing=False)
    if p["arch"] == "tiny":
        kw.update(img_size=64, buffer_size=4, diffloss_d=1, diffloss_w=64, num_sampling_steps="5")
        return mar_module.MAR(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2,
                              decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw)
    return mar_module.mar_base(**kw)


def _build_casmar(p: dict[str, Any], group: str):
    from functools import partial

    import torch.nn as nn
    from models import casmar as casmar_module

    # main_casmar.py defaults and the README's CASMAR-B evaluation flags
    kw = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, mask_ratio_min=0.7,
              label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
              diffloss_d=6, diffloss_w=1024, num_sampling_steps="100", diffusion_batch_mul=1,
              grad_checkpointing=False, cond_drop_prob=0.5, diff_seqlen=False, step_warmup=100,
              step_stage2_rate=0.25, cond_scale=8, cond_dim=16, two_diffloss=True, seq_len=256,
              global_dm=True, gdm_w=512, gdm_d=6, head=8, ratio=4, cos=True)
    if group == "casmar_v1":
        kw.update(train_mask_ratio_var=0.10, train_saliency_delta=0.5)
    if p["arch"] == "tiny":
        # the DiT head is built for a 16x16 grid, so the image stays 256 px; everything else shrinks
        kw.update(buffer_size=4, diffloss_d=1, diffloss_w=64, num_sampling_steps="5", cond_scale=2,
                  gdm_w=32, gdm_d=1, head=1, ratio=2)
        return casmar_module.casmar(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2,
                                    decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4,
                                    norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw)
    return casmar_module.casmar_base(**kw)


def run_masked_ar(spec: dict[str, Any], env: Env, group: str, deadline: float) -> dict[str, Any]:
    torch = env.torch
    p = spec["params"]
    model = (_build_mar(p) if spec["kind"] == "mar" else _build_casmar(p, group)).to(env.dev).eval()
    B = p["batch"]
    labels = torch.randint(0, 1000, (B,), device=env.dev)
    kw = dict(bsz=B, num_iter=p["num_iter"], cfg=p["cfg"], cfg_schedule=p["cfg_schedule"], labels=labels,
              temperature=p["temperature"])
    if spec["kind"] == "casmar":
        kw.update(re_cfg=p["re_cfg"], vq_model=None)
    shapes = []

    def fn():
        # engine_mar.py: torch.no_grad() + torch.cuda.amp.autocast() (fp16) around sample_tokens
        with torch.no_grad(), env.autocast_fp16():
            out = model.sample_tokens(**kw)
        shapes.append([list(t.shape) for t in out] if isinstance(out, tuple) else list(out.shape))

    times = env.time_calls(fn, spec["warmup"], spec["reps"], deadline)
    ms = statistics.median(times)
    return {"ms": ms, "times_ms": times, "n": len(times), "peak_gb": env.peak_gb(),
            "images_per_s": B / ms * 1e3, "token_shape": shapes[-1], "batch": B, "num_iter": p["num_iter"],
            "params_m": sum(q.numel() for q in model.parameters()) / 1e6}


RUNNERS = {"train": run_train, "sample": run_sample, "mar": run_masked_ar, "casmar": run_masked_ar}


def _warm_libraries(env: Env) -> None:
    """cuBLAS / cuDNN handles and the fp16, TF32 and attention kernels exist before the first timed call."""
    torch = env.torch
    if not env.cuda:
        return
    a = torch.randn(1024, 1024, device=env.dev)
    for dt in (torch.float32, torch.float16):
        q = a.to(dt).view(1, 1, 1024, 1024)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        (a.to(dt) @ a.to(dt)).softmax(-1)
    torch.nn.functional.conv2d(a.view(1, 1, 1024, 1024), torch.randn(1, 1, 3, 3, device=env.dev))
    env.sync()


def worker_main(family: str, specs_path: str, peers_dir: str, device: str) -> int:
    with open(specs_path) as f:
        specs = json.load(f)
    if family == "mar-casmar":
        ensure_torchvision()
    env = Env(device)
    torch = env.torch
    versions = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if env.cuda else "cpu"}
    for mod in ("triton", "timm", "numpy"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    _emit("env", env=versions)
    _warm_libraries(env)
    active = ""
    for spec in specs:
        _emit("start", case=spec["name"])
        t0 = time.monotonic()
        deadline = t0 + spec["cap_s"] - 2.0
        group = spec["group"]
        fatal = False
        try:
            if group != active:
                activate_release(group, peers_dir)
                active = group
            _official_env(env, group)
            with cuda_to_cpu_mode() if not env.cuda else contextlib.nullcontext():
                res = {"status": "ok", **RUNNERS[spec["kind"]](spec, env, group, deadline)}
        except Exception as e:  # a failing peer is a result
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            status = "oom" if isinstance(e, torch.cuda.OutOfMemoryError) else "fail"
            res = {"status": status, "error": f"{msg} at {_where(e, peers_dir)}"}
            traceback.print_exc()
            fatal = "CUDA error" in str(e) or type(e).__name__ == "AcceleratorError"
        res.update(case=spec["name"], what=spec["what"], wall_s=round(time.monotonic() - t0, 1))
        _emit("result", result=res)
        env.free()
        if fatal:  # the CUDA context may be broken: the parent starts a fresh worker for the rest
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
