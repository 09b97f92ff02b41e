"""The ``maskar eval`` pipeline: load or generate samples, extract features, compute and report.

Metric names (``metrics=``):
- Inception (TF-Inception 2015-12-05): ``fid``, ``sfid``, ``is`` (needs ``inception_is=PATH``),
  ``pr`` (improved precision / recall, k = 3);
- classifier (``classifier=DIR``, small grayscale data): ``fd_clf`` (Fréchet distance in its
  penultimate features), ``acc`` (its accuracy on class-conditional samples), ``pr_clf``.
Every reported number carries its feature network, sample count and reference set.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from maskar.checkpoint import check_writable
from maskar.cli_args import (
    bool_option,
    choice_option,
    float_option,
    int_option,
    parse_labels,
    str_option,
)
from maskar.config import ConfigError, DataConfig, apply_overrides, build, check_device_name, to_dict
from maskar.eval.images import ImageSet, images_from_array, open_images
from maskar.eval.metrics import frechet_distance, inception_score, precision_recall
from maskar.eval.reference import (
    Stats,
    default_cache_dir,
    extract_features,
    reference_stats,
    stats_from_features,
)

INCEPTION_METRICS = ("fid", "sfid", "is", "pr")
CLASSIFIER_METRICS = ("fd_clf", "acc", "pr_clf")

# The subcommand's own key=value options and their defaults (the CLI splits them from overrides).
OPTIONS: dict[str, object] = {
    "samples": None,
    "ckpt": None,
    "ref": None,
    "metrics": None,
    "inception": None,
    "inception_is": None,
    "classifier": None,
    "clf_ref": None,
    "per_class": None,
    "labels": None,
    "batch_size": 100,
    "sample_batch_size": 64,
    "precision": "auto",
    "ema": True,
    "verify": True,
    "save_samples": None,
    "device": "auto",
    "json": None,
    "cache": "default",
    "pr_batch": 10000,
    "ref_limit": None,
    "train_classifier": False,
    "out": None,
    "steps": 2000,
    "lr": 2e-3,
    "seed": 0,
    "eval_split": "test",
}


@dataclasses.dataclass
class Result:
    metric: str
    value: float
    network: str
    samples: str  # sample set and count
    reference: str  # reference set and count (or what the number is measured against)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        extra = "".join(f" {k}={v:.4g}" for k, v in self.extra.items())
        return (
            f"{self.metric:10s} {self.value:10.4f}{extra}\n"
            f"          network: {self.network}\n          samples: {self.samples}\n"
            f"          reference: {self.reference}"
        )


def parse_metrics(value: object, have_is: bool, have_classifier: bool) -> list[str]:
    if value is None:
        names = (
            list(CLASSIFIER_METRICS)
            if have_classifier
            else ["fid", "sfid", "pr"] + (["is"] if have_is else [])
        )
    else:
        names = [v for v in str(value).replace(" ", "").split(",") if v]
    known = INCEPTION_METRICS + CLASSIFIER_METRICS
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ConfigError(f"metrics: expected a comma-separated subset of {', '.join(known)}, got {value!r}")
    if "is" in names and not have_is:
        raise ConfigError(
            "metrics: is (Inception Score) needs the Inception classifier weights, which the FID file "
            "lacks; give inception_is=PATH (e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth)"
        )
    if any(n in CLASSIFIER_METRICS for n in names) and not have_classifier:
        raise ConfigError(
            f"metrics: {', '.join(n for n in names if n in CLASSIFIER_METRICS)} need classifier=DIR "
            f"(train one with `maskar eval train_classifier=true data.name=fashion_mnist out=DIR`)"
        )
    return names


def evaluate(
    samples: ImageSet,
    metrics: list[str],
    ref: str | DataConfig | None = None,
    inception: Any = None,
    classifier: Any = None,
    clf_ref: str | DataConfig | None = None,
    batch_size: int = 100,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    pr_batch: int = 10000,
    progress: bool = True,
    ref_limit: int | None = None,
) -> list[Result]:
    """Compute ``metrics`` for ``samples``; ``inception`` / ``classifier`` are extractors."""
    results: list[Result] = []
    smp_desc = f"{samples.count} samples from {samples.description}"
    inc = [m for m in metrics if m in INCEPTION_METRICS]
    if inc:
        if inception is None:
            raise ConfigError(f"eval: {', '.join(inc)} need the Inception feature network")
        feats = extract_features(
            inception, samples, batch_size, "sample features (Inception)" if progress else None
        )
        own = stats_from_features(feats, samples.description, inception.name)
        need_ref = [m for m in inc if m != "is"]
        if need_ref and ref is None:
            raise ConfigError(
                f"eval: {', '.join(need_ref)} need ref=FILE.npz (ADM reference batch or stats), an image "
                f"folder, or ref=data (a maskar dataset, data.* keys)"
            )
        if need_ref:
            rs = reference_stats(
                ref, inception, "pr" in inc, "sfid" in inc, batch_size, cache_dir, ref_limit, progress
            )
        if "fid" in inc:
            fid = frechet_distance(own.mu, own.sigma, rs.mu, rs.sigma)
            results.append(Result("FID", fid, inception.name, smp_desc, rs.describe()))
        if "sfid" in inc:
            sfid = frechet_distance(own.mu_s, own.sigma_s, rs.mu_s, rs.sigma_s)
            results.append(
                Result("sFID", sfid, inception.name + ", mixed_6/conv[:7]", smp_desc, rs.describe())
            )
        if "is" in inc:
            score, std = inception_score(feats["logits"])
            splits = math.ceil(samples.count / 5000)
            results.append(
                Result("IS", score, inception.name + " + user classifier weights", smp_desc,
                       f"none (IS needs no reference); {splits} split(s) of <= 5000", {"std": std})
            )  # fmt: skip
        if "pr" in inc:
            p, r = precision_recall(rs.features, feats["pool"], 3, pr_batch, device, progress)
            results.append(Result("precision", p, inception.name + ", k=3", smp_desc, rs.describe()))
            results.append(Result("recall", r, inception.name + ", k=3", smp_desc, rs.describe()))
    clf = [m for m in metrics if m in CLASSIFIER_METRICS]
    if clf:
        feats = extract_features(
            classifier, samples, batch_size, "sample features (classifier)" if progress else None
        )
        own = stats_from_features(feats, samples.description, classifier.name)
        if "fd_clf" in clf or "pr_clf" in clf:
            if clf_ref is None:
                if not classifier.reference_path().is_file():
                    raise ConfigError(f"classifier: {classifier.reference_path()} is missing; give clf_ref=")
                rs = Stats.load(classifier.reference_path(), "classifier")
                if rs.network != classifier.name:
                    raise ConfigError(f"classifier: {classifier.reference_path()} does not match its weights")
            else:
                rs = reference_stats(clf_ref, classifier, "pr_clf" in clf, False, batch_size, cache_dir,
                                     ref_limit, progress)  # fmt: skip
            if "fd_clf" in clf:
                fd = frechet_distance(own.mu, own.sigma, rs.mu, rs.sigma)
                results.append(Result("FD_clf", fd, classifier.name, smp_desc, rs.describe()))
            if "pr_clf" in clf:
                p, r = precision_recall(rs.features, feats["pool"], 3, pr_batch, device, progress)
                results.append(Result("prec_clf", p, classifier.name + ", k=3", smp_desc, rs.describe()))
                results.append(Result("recall_clf", r, classifier.name + ", k=3", smp_desc, rs.describe()))
        if "acc" in clf:
            if samples.labels is None:
                raise ConfigError(
                    "metrics: acc needs the class of every sample: generate with ckpt=DIR, use an npz with "
                    "labels in arr_1, or give per_class=N for class-ordered samples "
                    "(as `maskar sample` writes)"
                )
            from maskar.eval.classifier import accuracy

            acc = accuracy(feats["logits"], samples.labels)
            results.append(Result("accuracy", acc, classifier.name, smp_desc, "the conditioning labels"))
    return results


def _data_config(base: DataConfig | None, overrides: list[str], defaults: dict | None = None) -> DataConfig:
    data = {"data": {**(defaults or {}), **(to_dict(base) if base is not None else {})}}
    return build(DataConfig, apply_overrides(data, overrides)["data"], "data")


def _ref_arg(value: object, data_cfg: DataConfig | None) -> str | DataConfig | None:
    if value is None:
        return None
    if str(value) == "data":
        if data_cfg is None:
            raise ConfigError(
                "ref=data: give the dataset with data.* keys (e.g. data.name=fashion_mnist) or ckpt=DIR"
            )
        return data_cfg
    return str(value)


def _class_order_labels(per_class: int, labels: object, num_classes: int | None, count: int) -> np.ndarray:
    if labels is not None:
        classes = parse_labels(labels, num_classes or 1_000_000)
    else:
        classes = list(range(num_classes if num_classes is not None else count // per_class))
    out = np.repeat(np.asarray(classes, dtype=np.int64), per_class)
    if len(out) != count:
        raise ConfigError(
            f"per_class: {len(classes)} classes x {per_class} = {len(out)} labels, "
            f"but there are {count} samples"
        )
    return out


def _options(opts: dict[str, Any], writable: bool = True) -> dict[str, Any]:
    """Every scalar option checked (type and range) before anything is loaded or computed;
    ``writable=False`` leaves out the probe that json= / save_samples= can be written (parse only)."""
    o = dict(opts)
    for key in ("batch_size", "sample_batch_size", "pr_batch", "steps"):
        o[key] = int_option(opts[key], key, min=1)
    for key in ("per_class", "ref_limit"):
        o[key] = None if opts[key] is None else int_option(opts[key], key, min=1)
    o["seed"] = int_option(opts["seed"], "seed")
    o["lr"] = float_option(opts["lr"], "lr", above=0.0)
    o["ema"] = bool_option(opts["ema"], "ema")
    o["verify"] = bool_option(opts["verify"], "verify")
    o["train_classifier"] = bool_option(opts["train_classifier"], "train_classifier")
    o["precision"] = choice_option(opts["precision"], "precision", ("auto", "bf16", "fp16", "fp32"))
    o["device"] = check_device_name(opts["device"], "device")
    for key in ("samples", "ckpt", "ref", "clf_ref", "classifier", "inception", "inception_is", "out"):
        o[key] = None if opts[key] is None else str_option(opts[key], key)
    o["eval_split"] = str_option(opts["eval_split"], "eval_split", "a split name")
    o["cache"] = str_option(opts["cache"], "cache", "a folder, default or none")
    for key, suffix in (("json", ".json"), ("save_samples", ".npz")):
        o[key] = None
        if opts[key] is not None:
            path = str_option(opts[key], key, "a file name")
            if not path.lower().endswith(suffix):
                raise ConfigError(f"{key}: expected a file name ending in {suffix}, got {path!r}")
            o[key] = str(check_writable(path, key)) if writable else path
    return o


def _check_ref_exists(ref: str | DataConfig | None, key: str) -> None:
    if isinstance(ref, str) and not Path(ref).exists():
        raise ConfigError(f"{key}: {ref!r} does not exist; expected an npz, an image folder or {key}=data")


def run(opts: dict[str, Any], overrides: list[str]) -> int:
    """``maskar eval`` with its options split from the ``data.*`` / ``sample.*`` overrides.

    Every option, path and reference is checked before any sample is generated or any feature
    computed, so a typo never costs the long part of the run.
    """
    from maskar.sampling import pick_device, read_generator_config

    data_over = [o for o in overrides if o.startswith("data.")]
    other_over = [o for o in overrides if not o.startswith("data.")]
    opts = _options(opts)
    device = pick_device(opts["device"])
    batch_size = opts["batch_size"]

    if opts["train_classifier"]:
        from maskar.eval.classifier import train_classifier

        if other_over:
            raise ConfigError(f"eval train_classifier: only data.* keys can be overridden, got {other_over}")
        if opts["out"] is None or not data_over:
            raise ConfigError(
                "eval train_classifier=true: give out=DIR and the data (e.g. data.name=fashion_mnist)"
            )
        check_writable(opts["out"], "out", directory=True)
        data_cfg = _data_config(None, data_over, {"channels": 1})
        meta = train_classifier(
            data_cfg, opts["out"], opts["steps"], batch_size=128, lr=opts["lr"],
            eval_split=opts["eval_split"], seed=opts["seed"], device=device,
        )  # fmt: skip
        print(
            f"classifier saved to {opts['out']}: accuracy {meta['test_accuracy']:.4f} on "
            f"data.name={data_cfg.name} split={meta['eval_split']} ({meta['test_count']} images); "
            f"network: {meta['network']}"
        )
        return 0

    if (opts["samples"] is None) == (opts["ckpt"] is None):
        raise ConfigError("eval: give exactly one of samples=FILE.npz|FOLDER and ckpt=DIR (with per_class=N)")
    classifier = None
    if opts["classifier"] is not None:
        from maskar.eval.classifier import ClassifierExtractor

        classifier = ClassifierExtractor(opts["classifier"], device)
    metrics = parse_metrics(opts["metrics"], opts["inception_is"] is not None, classifier is not None)

    ckpt_data: DataConfig | None = None
    gen_cfg = None
    if opts["ckpt"] is not None:
        if opts["per_class"] is None:
            raise ConfigError(
                "eval ckpt=DIR: give per_class=N (samples per class; 50 gives the standard 50k)"
            )
        parse_labels(opts["labels"], None)  # the syntax now; the range once the model is known
        gen_cfg = read_generator_config(opts["ckpt"], other_over)  # no weights read yet
        ckpt_data = gen_cfg.data
    else:
        if other_over:
            raise ConfigError(f"eval samples=...: only data.* keys can be overridden, got {other_over}")
        samples = open_images(opts["samples"])
        if samples.labels is None and opts["per_class"] is not None:
            n_cls = classifier.model.num_classes if classifier is not None else None
            samples.labels = _class_order_labels(opts["per_class"], opts["labels"], n_cls, samples.count)

    data_cfg = _data_config(ckpt_data, data_over) if (data_over or ckpt_data is not None) else None
    ref = _ref_arg(opts["ref"], data_cfg)
    clf_ref = _ref_arg(opts["clf_ref"], data_cfg)
    _check_ref_exists(ref, "ref")
    _check_ref_exists(clf_ref, "clf_ref")
    inception = None
    if any(m in INCEPTION_METRICS for m in metrics):
        from maskar.eval.inception import InceptionExtractor

        inception = InceptionExtractor(
            opts["inception"], device, opts["inception_is"], spatial="sfid" in metrics
        )

    if opts["ckpt"] is not None:
        from maskar import sampling

        model, cfg = sampling.load_for_sampling(
            opts["ckpt"], other_over, opts["device"], opts["ema"], opts["verify"]
        )
        classes = parse_labels(opts["labels"], int(getattr(model, "num_classes", 10)))
        n_images, sample_batch = len(classes) * opts["per_class"], opts["sample_batch_size"]
        sampling.check_sampling_memory(model, cfg, n_images, sample_batch, opts["precision"], False)
        sinks = []
        if opts["save_samples"]:  # written batch by batch while the next batches generate
            order = [c for c in classes for _ in range(opts["per_class"])]
            sinks.append(sampling.NpzStream(opts["save_samples"], len(order), order))
        images, labels = sampling.generate(
            model, cfg, classes, opts["per_class"], sample_batch, opts["precision"], sinks
        )
        del model
        knobs = ", ".join([*other_over, f"seed {cfg.sample.seed}", f"{opts['per_class']}/class"])
        desc = f"{Path(opts['ckpt']).name} ({knobs})"
        samples = images_from_array(images, desc, labels)
        if opts["save_samples"]:
            n = len(images)
            print(f"wrote {n} samples to {opts['save_samples']} (arr_0 uint8 NHWC, arr_1 labels)")

    cache = None if opts["cache"] in ("none", "false", "False") else opts["cache"]
    cache_dir = default_cache_dir() if cache == "default" else cache
    results = evaluate(
        samples, metrics, ref, inception, classifier, clf_ref, batch_size, str(device), cache_dir,
        opts["pr_batch"], ref_limit=opts["ref_limit"],
    )  # fmt: skip
    for r in results:
        print(r.line())
    if "is" not in metrics and inception is not None and opts["inception_is"] is None:
        print("IS        n/a: the FID Inception file has no classifier layer; give inception_is=PATH for IS")
    if opts["json"]:
        from maskar.checkpoint import atomic_write_text

        payload = {"samples": samples.description, "count": samples.count,
                   "results": [dataclasses.asdict(r) for r in results]}  # fmt: skip
        atomic_write_text(opts["json"], json.dumps(payload, indent=2) + "\n")
        print(f"wrote {opts['json']}")
    return 0
