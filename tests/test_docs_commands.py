"""Every ``maskar ...`` command a user can copy from the user-facing docs parses against today's code.

The commands are taken from the fenced shell blocks (```bash / ```sh / ```) and the inline code
spans of README.md and docs/*.md (the historical records docs/benchmarks.md, docs/changelog.md
and docs/quality.md are left out: they keep the commands as they ran with the flags of their day).
A command is ``maskar ...``, ``.venv/bin/maskar ...``, ``python -m maskar ...``,
``torchrun ... -m maskar ...``, ``python -m maskar.bench.NAME ...`` or ``python benchmarks/NAME.py ...``,
after any ``VAR=value`` environment prefix; comments, line continuations, redirections and the
other commands of a pipeline or ``&&`` list are dropped. Notation of the docs: a bare ``...``
("more arguments") is dropped, optional groups ``[key=value]`` are checked as if given,
``bench a|b`` is checked for each name, and ``preset=NAME`` is checked against every preset.

Each command is checked without doing its work (no model built, no data or weights read; only
presets and the config.yaml of checkpoints shipped in the repository): the subcommand exists;
``key=value`` options of train / sample / edit / eval / info / cache are checked by the CLI's own
option checks and every override resolves with the config validation the CLI uses (against the
shipped checkpoint it names, or, for a checkpoint that is not in the repository, against the
presets of the architecture its name says, else of any architecture: one must accept it);
``bench NAME`` exists and its arguments parse with that bench's own parser; ``convert NAME``
exists and its arguments parse with the converter's ``parse``, its overrides against the schema.
Label ranges, image sizes and anything else that needs the model are not checked.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from maskar import cli, registry
from maskar.config import (
    Config,
    ConfigError,
    apply_overrides,
    build,
    dump_yaml,
    load_config,
    preset_names,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md",) + tuple(
    f"docs/{name}.md"
    for name in (
        "training", "evaluation", "var_hmar", "mar", "casmar", "data", "tokenizers", "reliability",
        "protocol", "kernels", "architecture",
    )
)  # fmt: skip
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
PLACEHOLDER_PRESET = "NAME"  # preset=NAME: "any preset"

# Commands that are not checked: (doc, regex on the command text or on its source line, reason).
# Each must still match something (test_every_skip_and_substitution_is_used), so the list cannot rot.
SKIP: list[tuple[str, str, str]] = [
    ("docs/reliability.md", r"^\|\s*\d+\s*\|",
     "the bad-input table: deliberately invalid commands (with {CK}-style fields), run and checked "
     "by tests/test_bad_inputs.py"),
    ("docs/reliability.md", r"^maskar CMD: error:", "the format of an error message, not a command"),
    ("docs/protocol.md", r"^maskar bench NAME$", "NAME: any benchmark"),
    ("docs/architecture.md", r"^maskar convert NAME key=value \.\.\.$", "NAME: any converter"),
    ("docs/var_hmar.md", r"^maskar convert dtype shared_tokenizer=\.\.\.$",
     "names one option of `convert dtype` (whose full command docs/training.md gives)"),
    ("docs/kernels.md", r"^maskar bench sample sampler=\.\.\.$", "sampler=...: any of the sampler names"),
    ("docs/evaluation.md", r"^maskar bench quality plan=PLAN\.yaml ",
     "the usage line: PLAN.yaml is a placeholder (the full command below names a real plan)"),
]  # fmt: skip

# Placeholder values the doc defines next to the command: (doc, token, replacement, reason).
SUBSTITUTE: list[tuple[str, str, str, str]] = [
    ("docs/mar.md", "model.tokenizer.scale_factor=S", "model.tokenizer.scale_factor=1.0",
     "S is defined by the comment after the command (S = 1 / latent std)"),
]  # fmt: skip


# ----------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    text: str  # the command as the doc writes it (one logical line)
    source: str  # the doc's line where it starts
    argv: tuple[str, ...]  # what `maskar` receives: (subcommand, args ...)
    script: str | None = None  # benchmarks/NAME.py or maskar.bench.NAME when run as that script

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def snippets(markdown: str) -> Iterator[tuple[int, str, str]]:
    """(line, text, source line) of every logical line of a shell code block and every inline
    code span (a span may run over several lines)."""
    lines = markdown.splitlines()
    prose: list[tuple[int, str]] = []
    fence: str | None = None
    pending: tuple[int, str] | None = None
    for n, line in enumerate(lines, 1):
        m = re.match(r"^\s*(```+)\s*(\S*)", line)
        if m:
            fence = None if fence is not None else m.group(2).lower()
            pending = None
            prose.append((n, ""))  # a fence ends a paragraph
            continue
        if fence is None:
            prose.append((n, line))
            continue
        if fence not in SHELL_FENCES:
            continue
        start, text = pending if pending else (n, "")
        text = f"{text} {line.strip()}".strip()
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip())
            continue
        pending = None
        yield start, text, lines[start - 1]
    para: list[tuple[int, str]] = []
    for n, line in [*prose, (len(lines) + 1, "")]:
        if line.strip():
            para.append((n, line))
            continue
        if para:
            joined = "\n".join(text for _, text in para)
            for m in re.finditer(r"(`+)(.+?)\1", joined, re.S):
                first = para[0][0] + joined[: m.start()].count("\n")
                yield first, " ".join(m.group(2).split()), lines[first - 1]
        para = []


_LAUNCHER = re.compile(
    r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*"
    r"(?:\S*/)?(?:maskar|python3?|torchrun)(?:\s|$)|^(?:\S*/)?benchmarks/\w+\.py(?:\s|$)"
)
_OPERATORS = {"|", "||", "&", "&&", ";", ";;", "(", ")"}
_REDIRECTS = {">", ">>", "<", "<<", ">&", "<&", "&>", ">|"}


def _words(text: str) -> list[list[str]]:
    """The simple commands of a shell line: words, without comments and redirections."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    segments: list[list[str]] = [[]]
    tokens = list(lex)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _OPERATORS:
            segments.append([])
        elif tok in _REDIRECTS:
            if segments[-1] and segments[-1][-1].isdigit():  # 2>&1
                segments[-1].pop()
            i += 1  # the redirection's target
        else:
            segments[-1].append(tok)
        i += 1
    return [s for s in segments if s]


def _argv(words: list[str]) -> tuple[tuple[str, ...], str | None] | None:
    """(maskar's argv, script) of one simple command, or None if it does not run maskar."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]  # MASKAR_X=1 OMP_NUM_THREADS=1 ...
    if not words:
        return None
    prog = words[0].rsplit("/", 1)[-1]
    rest = words[1:]
    script = None
    if prog == "maskar":
        argv = rest
    elif prog.startswith("python") or prog == "torchrun":
        if re.fullmatch(r"(\S*/)?benchmarks/\w+\.py", rest[0] if rest else ""):
            script, argv = rest[0], ["bench", Path(rest[0]).stem, *rest[1:]]
        elif "-m" in rest and rest.index("-m") + 1 < len(rest):
            i = rest.index("-m")
            module, args = rest[i + 1], rest[i + 2 :]
            if module == "maskar":
                argv = args
            elif module.startswith("maskar.bench."):
                script, argv = module, ["bench", module.split(".")[2], *args]
            else:
                return None
        else:
            return None
    elif re.fullmatch(r"(\S*/)?benchmarks/\w+\.py", words[0]):
        script, argv = words[0], ["bench", Path(words[0]).stem, *rest]
    else:
        return None
    argv = [w for w in argv if w != "..."]  # "more arguments"
    return (tuple(argv), script) if argv else None


def _expand(text: str) -> list[str]:
    """The doc's notation: optional groups checked as given, ``bench a|b`` checked for each name."""
    text = re.sub(r"(?<!\S)\[([^\[\]]*)\](?!\S)", r"\1", text)
    m = re.search(r"\bbench (\w+(?:\|\w+)+)", text)
    if m:
        return [text[: m.start(1)] + alt + text[m.end(1) :] for alt in m.group(1).split("|")]
    return [text]


def extract(doc: str, markdown: str) -> list[DocCommand]:
    out = []
    for line, text, source in snippets(markdown):
        if not re.search(r"\bmaskar\b|\bbenchmarks/", text):
            continue
        for variant in _expand(text):
            try:
                commands = _words(variant)
            except ValueError:  # unbalanced quotes: prose, unless it reads as a command
                if _LAUNCHER.match(text):
                    raise ValueError(f"{doc}:{line}: cannot split {text!r} as a shell line") from None
                continue
            for words in commands:
                found = _argv(words)
                if found:
                    out.append(DocCommand(doc, line, text, source, *found))
    return out


def skip_reason(cmd: DocCommand) -> str | None:
    for doc, pattern, reason in SKIP:
        if cmd.doc == doc and (re.search(pattern, cmd.text) or re.search(pattern, cmd.source.strip())):
            return reason
    return None


def substituted(cmd: DocCommand) -> tuple[str, ...]:
    argv = list(cmd.argv)
    for doc, token, replacement, _ in SUBSTITUTE:
        if cmd.doc == doc:
            argv = [replacement if a == token else a for a in argv]
    return tuple(argv)


def doc_commands() -> list[DocCommand]:
    return [cmd for doc in DOCS for cmd in extract(doc, (ROOT / doc).read_text())]


# ----------------------------------------------------------------------------- checking


class DocCommandError(Exception):
    pass


def _argparse(parse: Callable[[], Any]) -> Any:
    """Run an argparse ``parse_args``; its usage error becomes an exception with the message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse()
    except SystemExit as e:
        raise DocCommandError(err.getvalue().strip() or str(e.code)) from None


def _shipped(path: object) -> Path | None:
    """A checkpoint shipped in the repository (checkpoints/NAME with its config.yaml), or None."""
    p = Path(str(path))
    if p.parts[:1] == ("checkpoints",) and (ROOT / p / "config.yaml").is_file():
        return ROOT / p
    return None


def _arch_guess(path: object, archs: list[str]) -> list[str]:
    """The architectures a checkpoint path's last component names (``runs/hmar-s2``: hmar), else all."""
    words = set(re.split(r"[^a-z0-9]+", Path(str(path)).name.lower()))
    return [a for a in archs if a in words] or archs


class Checker:
    """Parse-only checks of ``maskar`` argv lists; ``preset_dirs`` holds one config.yaml per preset
    (a checkpoint's config without weights) for commands that name a checkpoint not in the repo."""

    def __init__(self, preset_dirs: Path):
        self.configs = {name: load_config(name) for name in preset_names()}
        self.preset_dirs = preset_dirs
        for name, cfg in self.configs.items():
            (preset_dirs / name).mkdir(parents=True, exist_ok=True)
            (preset_dirs / name / "config.yaml").write_text(dump_yaml(cfg))

    def check(self, argv: tuple[str, ...] | list[str], script: str | None = None) -> None:
        ns = _argparse(lambda: cli.build_parser().parse_args(list(argv)))
        args = list(ns.args)
        if ns.command in ("bench", "convert"):
            getattr(self, ns.command)(args, script)
        elif args:  # without arguments: the doc names the subcommand
            getattr(self, ns.command)(args)

    # -- helpers

    def _presets(self, archs: list[str] | None = None) -> list[str]:
        return [p for p, c in self.configs.items() if archs is None or c.model.arch in archs]

    @staticmethod
    def _any(candidates: list[str], attempt: Callable[[str], Any], what: str) -> Any:
        errors = []
        for candidate in candidates:
            try:
                return attempt(candidate)
            except (ConfigError, SystemExit) as e:
                errors.append(f"{candidate}: {e}")
        raise DocCommandError(f"no preset accepts {what}; e.g. {errors[0] if errors else 'none'}")

    def _config(self, opts: dict, overrides: list[str], what: str) -> None:
        if opts.get("preset") == PLACEHOLDER_PRESET:
            self._any(self._presets(), lambda p: load_config(p, overrides), " ".join(overrides))
        else:
            load_config(cli._config_source(opts, what), overrides)

    def _generator(self, ckpt: object, overrides: list[str]) -> Config:
        """The checkpoint's config with the overrides, as sample / edit / eval read it."""
        from maskar.sampling import read_generator_config

        if _shipped(ckpt):
            return read_generator_config(str(_shipped(ckpt)), overrides)
        gens = sorted(a for a, s in registry.all_specs().items() if s.kind == "generator")
        presets = self._presets(_arch_guess(ckpt, gens))
        return self._any(
            presets,
            lambda p: read_generator_config(str(self.preset_dirs / p), overrides),
            " ".join(overrides),
        )

    # -- subcommands

    def info(self, args: list[str]) -> None:
        from maskar.checkpoint import read_config, resolve_checkpoint_dir
        from maskar.cli_args import bool_option

        opts, overrides = cli._split_args(args, cli.INFO_OPTIONS)
        bool_option(opts["verify"], "verify")
        if opts["ckpt"] is None:
            self._config(opts, overrides, "info")
        elif _shipped(opts["ckpt"]):
            read_config(resolve_checkpoint_dir(_shipped(opts["ckpt"])))

    def train(self, args: list[str]) -> None:
        opts, overrides = cli._split_args(args, cli.TRAIN_OPTIONS)
        self._config(opts, overrides, "train")

    def cache(self, args: list[str]) -> None:
        opts, overrides = cli._split_args(args, cli.CACHE_OPTIONS)
        cli.cache_values(opts)
        self._config(opts, overrides, "cache")

    def sample(self, args: list[str]) -> None:
        from maskar.sampling import image_format

        opts, overrides = cli._split_args(args, cli.SAMPLE_OPTIONS)
        cli.sample_values(opts)
        image_format(str(opts["out"]))
        self._generator(opts["ckpt"], overrides)

    def edit(self, args: list[str]) -> None:
        from maskar.sampling import image_format, parse_mask

        opts, overrides = cli._split_args(args, cli.EDIT_OPTIONS)
        cli.edit_values(opts)
        image_format(str(opts["out"]))
        if str(opts["mask"]).startswith(("box:", "outpaint:")):  # else a mask image, not read here
            parse_mask(str(opts["mask"]), 16)
        self._generator(opts["ckpt"], overrides)

    def eval(self, args: list[str]) -> None:
        from maskar.cli_args import parse_labels
        from maskar.eval import run

        opts, overrides = cli._split_args(args, run.OPTIONS)
        o = run._options(opts, writable=False)
        data_over = [x for x in overrides if x.startswith("data.")]
        other_over = [x for x in overrides if not x.startswith("data.")]
        base = None
        if o["train_classifier"]:
            if other_over:
                raise DocCommandError(f"eval train_classifier: only data.* keys, got {other_over}")
            run._data_config(None, data_over, {"channels": 1})
            return
        run.parse_metrics(o["metrics"], o["inception_is"] is not None, o["classifier"] is not None)
        if o["ckpt"] is not None:
            parse_labels(o["labels"], None)
            base = self._generator(o["ckpt"], other_over).data
        elif other_over:
            raise DocCommandError(f"eval samples=...: only data.* keys can be overridden, got {other_over}")
        if data_over or base is not None:
            run._data_config(base, data_over)

    def bench(self, args: list[str], script: str | None) -> None:
        name, rest = (args[0], args[1:]) if args else (None, [])
        available = cli.command_names("maskar.bench")  # what `maskar bench` accepts
        if name not in available:
            raise DocCommandError(f"bench: expected one of {available}, got {name!r}")
        if script is not None and script.endswith(".py"):  # python benchmarks/NAME.py
            path = ROOT / script
            if not path.is_file() or f"maskar.bench.{name}" not in path.read_text():
                raise DocCommandError(f"{script}: no such script around maskar.bench.{name}")
        elif script is not None:  # python -m maskar.bench.NAME
            if '__name__ == "__main__"' not in (ROOT / "maskar" / "bench" / f"{name}.py").read_text():
                raise DocCommandError(f"python -m {script}: the module does not run as a script")
        mod = importlib.import_module(f"maskar.bench.{name}")
        if not rest or set(rest) & set(cli.HELP_FLAGS):
            return  # the doc names the benchmark, runs its defaults or asks its usage (test_cli)
        if hasattr(mod, "build_parser"):
            ns = _argparse(lambda: mod.build_parser().parse_args(rest))
            if getattr(ns, "preset", None) is not None:
                load_config(ns.preset)
        elif hasattr(mod, "_parse"):
            mod._parse(rest)
        elif name == "quality":
            self._quality(rest)
        else:
            raise DocCommandError(f"bench {name}: no parse hook (build_parser or _parse) to check {rest}")

    @staticmethod
    def _quality(argv: list[str]) -> None:
        """``bench quality`` (maskar.eval.study.main) with its work and file writes stubbed out;
        the plan file, a config, is read."""
        from maskar.eval import study

        mp = pytest.MonkeyPatch()
        try:
            mp.setattr(study, "run_study", lambda *a, **k: None)
            mp.setattr(study, "merge_reports", lambda paths: {})
            mp.setattr(study, "_write", lambda path, report: None)
            mp.chdir(ROOT)  # plan= paths are relative to the repository
            with contextlib.redirect_stdout(io.StringIO()):
                study.main(list(argv))
        finally:
            mp.undo()

    def convert(self, args: list[str], script: str | None = None) -> None:
        from maskar.convert.common import resolve_config

        name, rest = (args[0], args[1:]) if args else (None, [])
        available = cli.command_names("maskar.convert")  # what `maskar convert` accepts
        if name not in available:
            raise DocCommandError(f"convert: expected one of {available}, got {name!r}")
        if not rest or set(rest) & set(cli.HELP_FLAGS):
            return  # the doc names the converter or asks its usage (test_cli)
        mod = importlib.import_module(f"maskar.convert.{name}")
        parsed, overrides = mod.parse(rest)
        if name == "dtype":
            self._dtype(parsed["src"], overrides)
        elif "ckpt" not in parsed:  # (an export to the official layout takes no overrides)
            preset = parsed.get("preset") or getattr(mod, "DEFAULT_PRESET", None)
            base = None
            if not preset:  # the file's sizes: its official config where known, else the defaults
                if name == "vqvae":
                    base = mod.official_config(int(parsed.get("pn", 256)))
                elif name == "klvae":
                    base = mod.official_config()
                else:
                    base = registry.get_model_spec(name).config_cls()
            resolve_config(name, preset, overrides, base)

    def _dtype(self, src: str, overrides: list[str]) -> None:
        """``convert dtype``'s overrides, applied to the source's config as cast_checkpoint does."""
        from maskar.checkpoint import read_config, resolve_checkpoint_dir

        def apply(cfg: Config) -> Config:
            return build(Config, apply_overrides(to_dict(cfg), overrides))

        if _shipped(src):
            apply(read_config(resolve_checkpoint_dir(_shipped(src))))
        elif overrides:
            presets = self._presets(_arch_guess(src, sorted(registry.all_specs())))
            self._any(presets, lambda p: apply(self.configs[p]), " ".join(overrides))


# ----------------------------------------------------------------------------- tests

COMMANDS = doc_commands()
CHECKED = [c for c in COMMANDS if not skip_reason(c)]  # the SKIP rules say why the others are not


@pytest.fixture(scope="module")
def checker(tmp_path_factory) -> Checker:
    return Checker(tmp_path_factory.mktemp("preset-configs"))


@pytest.mark.parametrize("cmd", CHECKED, ids=[f"{c.doc}:{c.line}:{' '.join(c.argv)[:50]}" for c in CHECKED])
def test_documented_command_parses(cmd: DocCommand, checker: Checker):
    try:
        checker.check(substituted(cmd), cmd.script)
    except (ConfigError, SystemExit, DocCommandError) as e:
        pytest.fail(f"{cmd}\n  maskar {' '.join(substituted(cmd))}\n  does not parse: {e}", pytrace=False)


def test_the_docs_give_commands_of_every_kind():
    seen = {c.argv[0] for c in COMMANDS}
    assert {"train", "sample", "edit", "eval", "bench", "convert", "info", "cache"} <= seen
    texts = {c.text for c in COMMANDS}
    # a quick-start line after `&&`, a torchrun launch continued over lines, a python -m bench
    assert any(t.startswith("./scripts/setup.sh && .venv/bin/maskar sample ckpt=") for t in texts)
    assert any(c.doc == "docs/var_hmar.md" and c.argv[:2] == ("train", "preset=hmar-d16-finetune")
               and "train.out_dir=runs/hmar-d16-ft" in c.argv for c in COMMANDS)  # fmt: skip
    assert any(c.argv[:2] == ("bench", "tokenizer_quality") for c in COMMANDS)
    assert len(CHECKED) > 150


def test_every_skip_and_substitution_is_used():
    for doc, pattern, _reason in SKIP:
        assert any(
            c.doc == doc and (re.search(pattern, c.text) or re.search(pattern, c.source.strip()))
            for c in COMMANDS
        ), f"SKIP rule {pattern!r} ({doc}) matches no command any more; remove it"
    for doc, token, _, _ in SUBSTITUTE:
        assert any(c.doc == doc and token in c.argv for c in COMMANDS), f"SUBSTITUTE {token!r} unused"


def test_extraction_of_shell_notation():
    md = (
        "Run `maskar info` or:\n\n"
        "```bash\n"
        "MASKAR_X=1 maskar train preset=toy \\\n"
        "    train.steps=3 > log.txt 2>&1   # a comment; maskar eval\n"
        "python -m maskar bench mar --batch 2 | tee out\n"
        "```\n\n"
        "```python\nmaskar train preset=nosuch\n```\n\n"
        "and `maskar bench mar|casmar [--linears low]` and\n`torchrun --nproc_per_node 2 -m maskar train\n"
        "preset=toy ...`.\n"
    )
    got = [(c.line, c.argv) for c in extract("x.md", md)]
    assert got == [
        (4, ("train", "preset=toy", "train.steps=3")),
        (6, ("bench", "mar", "--batch", "2")),
        (1, ("info",)),
        (13, ("bench", "mar", "--linears", "low")),
        (13, ("bench", "casmar", "--linears", "low")),
        (14, ("train", "preset=toy")),
    ]


@pytest.mark.parametrize(("line", "words"), [
    ("maskar train preset=toy train.stepz=3", "unknown key train.stepz"),
    ("maskar info preset=NAME train.lrr=1e-4", "unknown key train.lrr"),
    ("maskar sample ckpt=checkpoints/hmar-fmnist sample.cgf=2.0", "unknown key sample.cgf"),
    ("maskar sample ckpt=runs/hmar-s2 sample.cfg=2.0 sample.top_kk=900", "unknown key sample.top_kk"),
    ("maskar sample ckpt=runs/hmar labels=0,1,2 per_clas=8", "only sample.* and attention_backend"),
    ("maskar eval ckpt=runs/mar-b per_class=50 sample.num_iters=64", "unknown key sample.num_iters"),
    ("maskar edit ckpt=runs/mar-b image=in.png mask=box:0.75,0.25,0.25,0.75", "mask: box must satisfy"),
    ("maskar convert dtype src=runs/kl out=ckpt/kl model.scale_facter=0.4", "unknown key model.scale_facter"),
    ("maskar convert hmar src=a.pth vae=b.pth out=c stage=3", "stage must be 1 or 2"),
    ("maskar convert mar src=a.pth out=c vea=kl16.ckpt", "unknown argument 'vea'"),
    ("maskar bench mar --batch-size 64", "unrecognized arguments: --batch-size"),
    ("python benchmarks/psa.py --devices cpu", "unrecognized arguments: --devices"),
    ("maskar bench sample modez=fast", "unknown key 'modez'"),
    ("python -m maskar.bench.quality merge=a.json b.json", "the module does not run as a script"),
    ("maskar bench nosuch", "bench: expected one of"),
    ("maskar nosuchcommand", "invalid choice"),
])  # fmt: skip
def test_the_checker_catches_stale_commands(checker: Checker, line: str, words: str):
    (cmd,) = extract("x.md", f"```bash\n{line}\n```\n")
    with pytest.raises((ConfigError, SystemExit, DocCommandError), match=re.escape(words)):
        checker.check(cmd.argv, cmd.script)
