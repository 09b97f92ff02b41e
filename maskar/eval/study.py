"""A quality study: many sampling settings of a few checkpoints, scored in one process.

``maskar bench quality plan=PLAN.yaml ckpt.NAME=DIR ... out=DIR`` reads a plan (rows of sampling
settings per model), generates every point with :func:`maskar.sampling.generate` (the sampler of
``maskar sample`` / ``maskar eval``), scores it with the small-data classifier (Fréchet distance,
class accuracy, precision / recall, via :func:`maskar.eval.run.evaluate`), times it, and writes
one JSON with a row per point. Loading the models and the classifier once is what makes a few
hundred thousand samples fit into minutes of GPU time; each row still records the single
``maskar eval`` command that reproduces it alone (same checkpoint, overrides, seed, sample count
and batch split), which docs/quality.md prints beside the number.

The TF-Inception FID is not computed here: its weights (87 MB) cannot travel to a machine that
takes 64 MiB. Rows with ``save`` keep a class-balanced subset of their samples as an npz
(``arr_0`` uint8 (N, H, W), ``arr_1`` labels) for ``maskar eval samples=... ref=data`` later,
and record that command too.

A plan (YAML)::

    classes: 10
    rows:
      - {name: main, model: var, n: 10000, seeds: [0, 1, 2], save: 2000, grid: 8}
      - {name: cfg, model: var, n: 5000, sweep: {key: sample.cfg, values: [1.0, 2.0, 3.0]}}
      - {name: schedule, model: hmar, n: 5000,
         variants: {default: [], "no refinement": [sample.refine=false]}}
      - {name: train_curve, model: var, n: 2000, run: var}   # every step-* checkpoint of run.var=DIR
      - {name: speed, model: var, batch: 500, reps: 3}      # images/s (warm-up batch not timed)

Row keys: ``name``, ``model`` (a ``ckpt.NAME`` / ``run.NAME`` given on the command line), ``n``
(samples, a multiple of ``classes``), ``seeds`` (default [0]), ``overrides`` (``sample.*``
strings applied to every point of the row), at most one of ``sweep`` / ``variants``, ``save``,
``grid`` (a labelled PNG of the first ``grid`` samples per class of the point's first seed,
``grid_MODEL.png`` for ``main`` rows, ``grid_MODEL_ROW_LABEL.png`` otherwise), ``run``, and for
``speed`` rows ``batch`` and ``reps``.

``models=a,b`` runs only those models' rows and ``kinds=quality`` / ``kinds=speed`` only the
scored rows / the speed rows of a plan, so one plan can be split over processes (each model's
rows start as soon as it is trained; speed rows run alone at the end, on a quiet GPU);
``maskar bench quality merge=OUT.json IN.json ...`` joins their JSON files.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from maskar.config import ConfigError, parse_override, to_dict

CLASSIFIER_METRICS = ["fd_clf", "acc", "pr_clf"]
DATA_ROOT = "/usr/share/datasets/fashion-mnist"
ROW_KEYS = {
    "name", "model", "n", "seeds", "overrides", "sweep", "variants", "save", "grid", "run", "batch", "reps"
}  # fmt: skip
KINDS = ("all", "quality", "speed")


@dataclasses.dataclass
class Point:
    """One sampling setting of one model, scored as a unit."""

    row: str
    model: str
    label: str  # the value that varies along the row ("default" when nothing varies)
    overrides: list[str]
    seed: int
    n: int
    save: int = 0
    ckpt: str | None = None  # a step checkpoint (train_curve rows); else the model's ckpt
    step: int | None = None
    grid: int = 0  # per class, first seed only


# ----------------------------------------------------------------------------- the plan


def load_plan(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"plan: {str(p)!r} is not a file; expected a study plan (YAML)")
    plan = yaml.safe_load(p.read_text()) or {}
    rows = plan.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"plan: {p.name} has no rows (a list of row mappings)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "name" not in row or "model" not in row:
            raise ConfigError(f"plan: row {i} must be a mapping with name and model, got {row!r}")
        unknown = sorted(set(row) - ROW_KEYS)
        if unknown:
            raise ConfigError(
                f"plan: row {row['name']!r} has unknown key(s) {unknown}; valid: {sorted(ROW_KEYS)}"
            )
        if "sweep" in row and "variants" in row:
            raise ConfigError(f"plan: row {row['name']!r} has both sweep and variants; give one")
        for o in row.get("overrides", []) + [o for v in (row.get("variants") or {}).values() for o in v]:
            if not str(o).startswith("sample."):
                raise ConfigError(f"plan: row {row['name']!r}: overrides must be sample.* keys, got {o!r}")
            parse_override(str(o))
    return plan


def _scaled(n: int, scale: float, classes: int) -> int:
    """``n`` times ``scale``, rounded to a positive multiple of ``classes``."""
    return max(classes, int(round(n * scale / classes)) * classes)


def expand(plan: dict[str, Any], scale: float, runs: dict[str, str]) -> list[Point]:
    """The plan's rows as points (speed rows excluded; see :func:`speed_rows`)."""
    from maskar.checkpoint import list_step_checkpoints

    classes = int(plan.get("classes", 10))
    points: list[Point] = []
    for row in plan["rows"]:
        if row["name"] == "speed":
            continue
        n = _scaled(int(row.get("n", 1000)), scale, classes)
        save = _scaled(int(row["save"]), scale, classes) if row.get("save") else 0
        base = [str(o) for o in row.get("overrides", [])]
        settings: list[tuple[str, list[str]]] = [("default", [])]
        if "sweep" in row:
            key = row["sweep"]["key"]
            settings = [(str(v), [f"{key}={json.dumps(v)}"]) for v in row["sweep"]["values"]]
        elif "variants" in row:
            settings = [(str(k), [str(o) for o in v]) for k, v in row["variants"].items()]
        seeds = [int(s) for s in row.get("seeds", [0])]
        if "run" in row:
            run_dir = runs.get(row["run"])
            if run_dir is None:
                raise ConfigError(f"plan: row {row['name']!r} needs run.{row['run']}=DIR on the command line")
            steps = list_step_checkpoints(run_dir)
            if not steps:
                raise ConfigError(f"run.{row['run']}={run_dir!r} holds no step-* checkpoints")
            for step, path in steps:
                points += [Point(row["name"], row["model"], str(step), base, s, n, save, str(path), step)
                           for s in seeds]  # fmt: skip
            continue
        grid = int(row.get("grid", 0))
        for label, extra in settings:
            for s in seeds:
                points.append(Point(row["name"], row["model"], label, base + extra, s, n, save,
                                    grid=grid if s == seeds[0] else 0))  # fmt: skip
    return points


def select_rows(
    plan: dict[str, Any], models: list[str] | None = None, kinds: str = "all", names: list[str] | None = None
) -> dict[str, Any]:
    """The plan restricted to ``models`` (None: all), to its scored rows, its speed rows or both, and
    to the rows called ``names`` (None: all; a name starting with ``!`` excludes that row instead), so
    that one model's rows can run in several processes at once."""
    if kinds not in KINDS:
        raise ConfigError(f"kinds: expected one of {list(KINDS)}, got {kinds!r}")
    known = sorted({r["model"] for r in plan["rows"]})
    unknown = sorted(set(models or []) - set(known))
    if unknown:
        raise ConfigError(f"models: {unknown} not in the plan (its models: {known})")
    take = {n for n in names or [] if not n.startswith("!")}
    drop = {n[1:] for n in names or [] if n.startswith("!")}
    row_names = sorted({r["name"] for r in plan["rows"]})
    unknown = sorted((take | drop) - set(row_names))
    if unknown:
        raise ConfigError(f"rows: {unknown} not in the plan (its rows: {row_names})")
    if take and drop:
        raise ConfigError(f"rows: give names to run or !names to skip, not both (got {sorted(names or [])})")
    keep = [
        r
        for r in plan["rows"]
        if (models is None or r["model"] in models)
        and (kinds == "all" or (r["name"] == "speed") == (kinds == "speed"))
        and (not take or r["name"] in take)
        and r["name"] not in drop
    ]
    return {**plan, "rows": keep}


def merge_reports(paths: list[str | Path]) -> dict[str, Any]:
    """One report from the JSON files of processes that ran parts of a plan (missing files are
    skipped: a part that never started): rows and speed rows in the order given, the first
    file's meta with every file's checkpoints and a ``parts`` list."""
    reports = [(str(p), json.loads(Path(p).read_text())) for p in paths if Path(p).is_file()]
    if not reports:
        raise ConfigError(f"merge: none of {[str(p) for p in paths]} exists")
    meta = dict(reports[0][1]["meta"])
    meta["ckpts"] = {k: v for _, r in reports for k, v in r["meta"].get("ckpts", {}).items()}
    meta["parts"] = [{"file": Path(p).name, "date": r["meta"].get("date")} for p, r in reports]
    return {
        "meta": meta,
        "rows": [row for _, r in reports for row in r["rows"]],
        "speed": [row for _, r in reports for row in r["speed"]],
    }


def speed_rows(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in plan["rows"] if row["name"] == "speed"]


# ----------------------------------------------------------------------------- commands


def eval_command(shown_ckpt: str, p: Point, batch: int, classifier: str, classes: int) -> str:
    """The ``maskar eval`` command that scores point ``p`` alone, with the same samples."""
    parts = ["maskar eval", f"ckpt={shown_ckpt}", f"per_class={p.n // classes}", f"classifier={classifier}"]
    parts += [_quote(o) for o in p.overrides] + [f"sample.seed={p.seed}", f"sample_batch_size={batch}"]
    return " ".join(parts)


def inception_command(npz: str, data_root: str, json_out: str) -> str:
    """``maskar eval`` for the TF-Inception FID / precision / recall of saved samples (CPU here)."""
    return (
        f"maskar eval samples={npz} ref=data data.name=fashion_mnist data.root={data_root} "
        f"data.split=test data.channels=1 metrics=fid,pr device=cpu json={json_out}"
    )


def _quote(override: str) -> str:
    return f"'{override}'" if any(c in override for c in " []{}") else override


# ----------------------------------------------------------------------------- running


def _balanced_subset(labels: list[int], count: int, classes: int) -> np.ndarray:
    """Indices of ``count / classes`` samples of every class, interleaved (0, 1, .., 9, 0, 1, ..), so
    that every prefix of a multiple of ``classes`` rows is class-balanced too."""
    lab = np.asarray(labels)
    per = count // classes
    return np.stack([np.flatnonzero(lab == c)[:per] for c in range(classes)], axis=1).reshape(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_point(model, cfg, p: Point, batch: int, classifier, device: torch.device, classes: int):
    """Generate point ``p`` (``cfg`` already carries its overrides), time it, score it."""
    from maskar import sampling
    from maskar.eval.images import images_from_array
    from maskar.eval.run import evaluate

    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, seed=p.seed))
    _sync(device)
    t0 = time.perf_counter()
    images, labels = sampling.generate(model, cfg, list(range(classes)), p.n // classes, batch)
    _sync(device)
    seconds = time.perf_counter() - t0
    results = evaluate(
        images_from_array(images, f"{p.model} {p.label} seed {p.seed}", labels), CLASSIFIER_METRICS,
        classifier=classifier, batch_size=1000, device=str(device), progress=False,
    )  # fmt: skip
    metrics = {r.metric: r.value for r in results}
    meta = {r.metric: {"network": r.network, "samples": r.samples, "reference": r.reference} for r in results}
    return images, labels, seconds, metrics, meta


def measure_speed(model, cfg, batch: int, reps: int, device: torch.device, classes: int) -> dict[str, float]:
    """Images per second at ``batch``: one untimed warm-up batch, then ``reps`` timed batches."""
    from maskar import sampling

    per_class = max(1, batch // classes)
    sampling.generate(model, cfg, list(range(classes)), per_class, batch)  # warm-up, CUDA graphs
    times = []
    for r in range(reps):
        c = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, seed=1000 + r))
        _sync(device)
        t0 = time.perf_counter()
        sampling.generate(model, c, list(range(classes)), per_class, batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"batch": per_class * classes, "reps": reps, "seconds_median": med,
            "images_per_s": per_class * classes / med, "seconds_all": times}  # fmt: skip


def _save_npz(path: Path, images: torch.Tensor, labels: list[int]) -> None:
    from maskar.checkpoint import atomic_write_bytes

    gray = images[..., 0].numpy()  # (N, H, W): grayscale samples are stored once, not as RGB
    lab = np.asarray(labels, dtype=np.int64)
    atomic_write_bytes(path, lambda f: np.savez_compressed(f, arr_0=gray, arr_1=lab))


def run_study(
    plan: dict[str, Any],
    ckpts: dict[str, str],
    runs: dict[str, str],
    shown: dict[str, str],
    out_dir: str | Path,
    classifier_dir: str,
    device: str = "auto",
    batch: int = 1000,
    scale: float = 1.0,
    data_root: str = DATA_ROOT,
    tag: str = "study",
    extra: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run every point of ``plan``; write ``out_dir/TAG.json`` (and sample npz files); return it.

    ``extra``: ``sample.*`` overrides added after every point's own (where the model has the key):
    cheap dry runs of a real plan (fewer diffusion steps); rows then no longer mean what they say.
    """
    from maskar import sampling
    from maskar.eval.classifier import ClassifierExtractor

    dev = sampling.pick_device(device)
    classes = int(plan.get("classes", 10))
    points = expand(plan, scale, runs)  # checks every row (runs, counts) before any sampling
    missing = sorted({p.model for p in points if p.ckpt is None and p.model not in ckpts}
                     | {r["model"] for r in speed_rows(plan) if r["model"] not in ckpts})  # fmt: skip
    if missing:
        raise ConfigError(f"plan needs ckpt.{missing[0]}=DIR (models without a checkpoint: {missing})")
    out = Path(out_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    classifier = ClassifierExtractor(classifier_dir, dev)
    report: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": _device_name(dev),
            "torch": torch.__version__,
            "batch": batch,
            "scale": scale,
            "classifier": classifier.name,
            "ckpts": {k: shown.get(k, v) for k, v in ckpts.items()},
        },  # fmt: skip
        "rows": [],
        "speed": [],
    }
    path = out / f"{tag}.json"
    loaded: dict[tuple[str, tuple[str, ...]], Any] = {}
    # Rows of one plan often share a point (a cfg row's 2.0 is the temperature row's 1.0): the
    # same checkpoint, resolved config, seed and count give the same samples, so the first one's
    # scores serve the later ones (marked ``same_as``) unless those keep samples or a grid.
    done: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for row in plan["rows"]:  # in plan order: the first rows are measured first if time runs out
        if row["name"] == "speed":
            overrides = [str(o) for o in row.get("overrides", [])] + _applicable(extra, ckpts[row["model"]])
            loaded.clear()
            model, cfg = sampling.load_for_sampling(ckpts[row["model"]], overrides, str(dev))
            speed_batch = _scaled(int(row.get("batch", batch)), scale, classes)  # scale: dry runs
            res = measure_speed(model, cfg, speed_batch, int(row.get("reps", 3)), dev, classes)
            report["speed"].append({"model": row["model"], "overrides": overrides,
                                    "device": report["meta"]["device"], **res})  # fmt: skip
            print(
                f"speed {row['model']}: {res['images_per_s']:.1f} img/s at batch {res['batch']}", flush=True
            )
            _write(path, report)
            continue
        for p in expand({"classes": classes, "rows": [row]}, scale, runs):
            src = p.ckpt or ckpts[p.model]
            p.overrides = p.overrides + _applicable(extra, src)
            key = (src, tuple(p.overrides))
            if key not in loaded:
                loaded.clear()  # one model in memory at a time
                loaded[key] = sampling.load_for_sampling(src, p.overrides, str(dev))
            model, cfg = loaded[key]
            setting = json.dumps([src, to_dict(cfg), p.seed, p.n], sort_keys=True, default=str)
            first = None if (p.save or p.grid) else done.get(setting)
            if first is None:
                images, labels, seconds, metrics, meta = run_point(
                    model, cfg, p, batch, classifier, dev, classes
                )
            else:
                metrics, meta, seconds = first["metrics"], first["metric_meta"], first["seconds"]
            shown_ckpt = shown.get(p.model, ckpts.get(p.model, "")) if p.ckpt is None else p.ckpt
            result = {**dataclasses.asdict(p), "metrics": metrics, "metric_meta": meta, "seconds": seconds,
                      "images_per_s": p.n / seconds,
                      "command": eval_command(shown_ckpt, p, batch, classifier_dir, classes)}  # fmt: skip
            if first is not None:
                result["same_as"] = f"{first['row']} {first['label']}"
            else:
                done.setdefault(setting, result)
            if p.save:
                keep = _balanced_subset(labels, p.save, classes)
                name = f"{p.model}_{p.row}_{_slug(p.label)}_s{p.seed}"
                _save_npz(out / "samples" / f"{name}.npz", images[keep], [labels[j] for j in keep])
                result["samples_npz"] = f"samples/{name}.npz"
                result["inception_command"] = inception_command(
                    f"SAMPLES/{name}.npz", data_root, f"INCEPTION/{name}.json"
                )
            if p.grid:
                result["grid_png"] = _write_grid(out, p, images, labels, cfg, classes)
            report["rows"].append(result)
            print(
                f"[{time.perf_counter() - t_start:6.1f}s] {p.model} {p.row} {p.label} seed {p.seed} "
                f"n {p.n}: "
                + " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                + f" | {p.n / seconds:.1f} img/s"
                + (f" (the setting of {result['same_as']}: not sampled again)" if first is not None else ""),
                flush=True,
            )
            _write(path, report)  # after every point: a killed run keeps what it measured
    return report


def _write_grid(out: Path, p: Point, images: torch.Tensor, labels: list[int], cfg, classes: int) -> str:
    """The first ``p.grid`` samples of every class as a labelled PNG (one row per class)."""
    from maskar.sampling import class_names, save_grid

    lab = np.asarray(labels)
    idx = np.concatenate([np.flatnonzero(lab == c)[: p.grid] for c in range(classes)])
    name = f"grid_{p.model}.png" if p.row == "main" else f"grid_{p.model}_{p.row}_{_slug(p.label)}.png"
    save_grid(images[torch.from_numpy(idx)], [labels[i] for i in idx], str(out / name), nrow=p.grid,
              class_names=class_names(cfg))  # fmt: skip
    return name


def _applicable(extra: list[str] | tuple[str, ...], ckpt: str) -> list[str]:
    """The ``sample.*`` overrides of ``extra`` that the checkpoint's sample config has."""
    if not extra:
        return []
    from maskar.checkpoint import read_config, resolve_checkpoint_dir

    names = {f.name for f in dataclasses.fields(read_config(resolve_checkpoint_dir(ckpt)).sample)}
    return [e for e in extra if e.split("=", 1)[0].split(".", 1)[1] in names]


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-") or "x"


def _write(path: Path, report: dict[str, Any]) -> None:
    from maskar.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=1) + "\n")


# ----------------------------------------------------------------------------- command line

USAGE = (
    "maskar bench quality plan=PLAN.yaml out=DIR classifier=DIR ckpt.NAME=DIR [ckpt.NAME=DIR ...] "
    "[run.NAME=RUN_DIR] [as.NAME=SHOWN_PATH] [scale=1.0] [batch=1000] [device=auto] [tag=study] "
    "[data_root=/usr/share/datasets/fashion-mnist] [models=a,b] [kinds=all|quality|speed] "
    "[rows=main,cfg|!main] "
    "[sample.KEY=VALUE: added to every point, dry runs]; or: maskar bench quality merge=OUT.json IN.json ..."
)


def main(argv: list[str]) -> int:
    if argv and argv[0].startswith("merge="):
        out = argv[0].split("=", 1)[1]
        if not out or len(argv) < 2:
            raise ConfigError(f"bench quality merge: give merge=OUT.json and the input files; usage: {USAGE}")
        _write(Path(out), merge_reports(argv[1:]))
        print(f"wrote {out}")
        return 0
    opts: dict[str, Any] = {"plan": None, "out": None, "classifier": None, "scale": 1.0, "batch": 1000,
                            "device": "auto", "tag": "study", "data_root": DATA_ROOT, "models": None,
                            "kinds": "all", "rows": None}  # fmt: skip
    groups: dict[str, dict[str, str]] = {"ckpt": {}, "run": {}, "as": {}}
    extra: list[str] = []
    for item in argv:
        keys, value = parse_override(item)
        if keys[0] == "sample" and len(keys) > 1:
            extra.append(item)
        elif len(keys) == 2 and keys[0] in groups:
            groups[keys[0]][keys[1]] = str(value)
        elif len(keys) == 1 and keys[0] in opts:
            opts[keys[0]] = value
        else:
            raise ConfigError(f"bench quality: unknown option {item!r}; usage: {USAGE}")
    for k in ("plan", "out", "classifier"):
        if opts[k] is None:
            raise ConfigError(f"bench quality: give {k}=...; usage: {USAGE}")
    scale, batch = float(opts["scale"]), int(opts["batch"])
    if not 0 < scale <= 1:
        raise ConfigError(f"scale: expected a sample-count factor in (0, 1], got {scale}")
    if batch < 1:
        raise ConfigError(f"batch: expected >= 1, got {batch}")
    models = opts["models"]
    if models is not None:
        models = [str(m) for m in models] if isinstance(models, list) else str(models).split(",")
    names = opts["rows"]
    if names is not None:
        names = [str(n) for n in names] if isinstance(names, list) else str(names).split(",")
    plan = select_rows(load_plan(str(opts["plan"])), models, str(opts["kinds"]), names)
    if not plan["rows"]:
        raise ConfigError(
            f"plan {opts['plan']}: no rows for models={opts['models']} kinds={opts['kinds']} "
            f"rows={opts['rows']}"
        )
    run_study(plan, groups["ckpt"], groups["run"], groups["as"], str(opts["out"]),
              str(opts["classifier"]), str(opts["device"]), batch, scale, str(opts["data_root"]),
              str(opts["tag"]), extra)  # fmt: skip
    return 0
