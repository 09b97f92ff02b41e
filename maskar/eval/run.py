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

from maskar.cli_args import parse_labels
from maskar.config import ConfigError, DataConfig, apply_overrides, build, to_dict
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
                rs = Stats.load(classifier.reference_path())
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


def run(opts: dict[str, Any], overrides: list[str]) -> int:
    """``maskar eval`` with its options split from the ``data.*`` / ``sample.*`` overrides."""
    from maskar.sampling import pick_device

    data_over = [o for o in overrides if o.startswith("data.")]
    other_over = [o for o in overrides if not o.startswith("data.")]
    device = pick_device(str(opts["device"]))
    batch_size = int(opts["batch_size"])
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")

    if opts["train_classifier"]:
        from maskar.eval.classifier import train_classifier

        if other_over:
            raise ConfigError(f"eval train_classifier: only data.* keys can be overridden, got {other_over}")
        if opts["out"] is None or not data_over:
            raise ConfigError(
                "eval train_classifier=true: give out=DIR and the data (e.g. data.name=fashion_mnist)"
            )
        data_cfg = _data_config(None, data_over, {"channels": 1})
        meta = train_classifier(
            data_cfg, str(opts["out"]), int(opts["steps"]), batch_size=128, lr=float(opts["lr"]),
            eval_split=str(opts["eval_split"]), seed=int(opts["seed"]), device=device,
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

        classifier = ClassifierExtractor(str(opts["classifier"]), device)
    metrics = parse_metrics(opts["metrics"], opts["inception_is"] is not None, classifier is not None)

    ckpt_data: DataConfig | None = None
    if opts["ckpt"] is not None:
        from maskar import sampling

        if opts["per_class"] is None:
            raise ConfigError(
                "eval ckpt=DIR: give per_class=N (samples per class; 50 gives the standard 50k)"
            )
        model, cfg = sampling.load_for_sampling(
            str(opts["ckpt"]), other_over, str(opts["device"]), bool(opts["ema"])
        )
        ckpt_data = cfg.data
        classes = parse_labels(opts["labels"], int(getattr(model, "num_classes", 10)))
        images, labels = sampling.generate(
            model,
            cfg,
            classes,
            int(opts["per_class"]),
            int(opts["sample_batch_size"]),
            str(opts["precision"]),
        )
        del model
        knobs = ", ".join([*other_over, f"seed {cfg.sample.seed}", f"{int(opts['per_class'])}/class"])
        desc = f"{Path(str(opts['ckpt'])).name} ({knobs})"
        samples = images_from_array(images, desc, labels)
        if opts["save_samples"]:
            from maskar.checkpoint import atomic_write_bytes

            arr, lab = images.numpy(), np.asarray(labels, dtype=np.int64)
            atomic_write_bytes(str(opts["save_samples"]), lambda f: np.savez(f, arr_0=arr, arr_1=lab))
            print(f"wrote {len(arr)} samples to {opts['save_samples']} (arr_0 uint8 NHWC, arr_1 labels)")
    else:
        if other_over:
            raise ConfigError(f"eval samples=...: only data.* keys can be overridden, got {other_over}")
        samples = open_images(str(opts["samples"]))
        if samples.labels is None and opts["per_class"] is not None:
            n_cls = classifier.model.num_classes if classifier is not None else None
            samples.labels = _class_order_labels(int(opts["per_class"]), opts["labels"], n_cls, samples.count)

    data_cfg = _data_config(ckpt_data, data_over) if (data_over or ckpt_data is not None) else None
    ref = _ref_arg(opts["ref"], data_cfg)
    clf_ref = _ref_arg(opts["clf_ref"], data_cfg)
    inception = None
    if any(m in INCEPTION_METRICS for m in metrics):
        from maskar.eval.inception import InceptionExtractor

        inception = InceptionExtractor(
            opts["inception"], device, opts["inception_is"], spatial="sfid" in metrics
        )
    cache = None if str(opts["cache"]) in ("none", "false", "False") else opts["cache"]
    cache_dir = default_cache_dir() if cache == "default" else cache
    results = evaluate(
        samples, metrics, ref, inception, classifier, clf_ref, batch_size, str(device), cache_dir,
        int(opts["pr_batch"]), ref_limit=None if opts["ref_limit"] is None else int(opts["ref_limit"]),
    )  # fmt: skip
    for r in results:
        print(r.line())
    if "is" not in metrics and inception is not None and opts["inception_is"] is None:
        print("IS        n/a: the FID Inception file has no classifier layer; give inception_is=PATH for IS")
    if opts["json"]:
        from maskar.checkpoint import atomic_write_text

        payload = {"samples": samples.description, "count": samples.count,
                   "results": [dataclasses.asdict(r) for r in results]}  # fmt: skip
        atomic_write_text(str(opts["json"]), json.dumps(payload, indent=2) + "\n")
        print(f"wrote {opts['json']}")
    return 0
