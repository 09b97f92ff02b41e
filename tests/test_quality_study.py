"""The quality study's pieces: plan expansion, the study runner (whose printed `maskar eval` command
must reproduce its numbers), dtype export with config overrides, a generator checkpoint as
tokenizer source, and the shipped CASMAR / MAR demos (skipped until they exist)."""

import json
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from maskar.checkpoint import load_model, load_tensors
from maskar.cli import main as cli_main
from maskar.config import ConfigError, load_config
from maskar.convert.dtype import cast_checkpoint
from maskar.eval import study
from maskar.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CLF = ROOT / "checkpoints" / "fmnist-classifier"


def _plan(tmp_path, rows, classes=10):
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump({"classes": classes, "rows": rows}, sort_keys=False))
    return study.load_plan(p)


def test_plan_expands_rows_seeds_and_scales_counts(tmp_path):
    plan = _plan(
        tmp_path,
        [
            {"name": "main", "model": "a", "n": 10000, "seeds": [0, 1, 2], "save": 2000},
            {"name": "cfg", "model": "a", "n": 5000, "sweep": {"key": "sample.cfg", "values": [1.0, 2.5]}},
            {
                "name": "sched",
                "model": "b",
                "n": 5000,
                "overrides": ["sample.top_p=0.9"],
                "variants": {"off": ["sample.refine=false"], "default": []},
            },
            {"name": "speed", "model": "b", "batch": 100},
        ],
    )
    pts = study.expand(plan, 0.01, {})
    assert [(p.row, p.label, p.seed, p.n, p.save) for p in pts[:3]] == [
        ("main", "default", s, 100, 20) for s in range(3)
    ]
    assert [p.overrides for p in pts[3:5]] == [["sample.cfg=1.0"], ["sample.cfg=2.5"]]
    assert [p.overrides for p in pts[5:]] == [
        ["sample.top_p=0.9", "sample.refine=false"],
        ["sample.top_p=0.9"],
    ]
    assert study.expand(plan, 1e-6, {})[0].n == 10  # never below one sample per class
    assert [r["model"] for r in study.speed_rows(plan)] == ["b"]


def test_run_rows_expand_every_step_checkpoint_and_keep_save(tmp_path):
    """A training-curve row: one point per step-* checkpoint of its run, each keeping ``save`` (call 3
    scores those samples with the Inception network: FID at the checkpoints)."""
    run = tmp_path / "run"
    for step in (20, 40):
        (run / f"step-{step:07d}").mkdir(parents=True)
        (run / f"step-{step:07d}" / "model.safetensors").write_bytes(b"")
    plan = _plan(tmp_path, [{"name": "train_curve", "model": "a", "n": 1000, "run": "r", "save": 1000}])
    pts = study.expand(plan, 0.01, {"r": str(run)})
    assert [(p.label, p.n, p.save, p.step) for p in pts] == [("20", 10, 10, 20), ("40", 10, 10, 40)]
    assert all(p.ckpt.endswith(f"step-{p.step:07d}") for p in pts)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"name": "x", "model": "a", "bogus": 1}, "unknown key"),
        ({"name": "x", "model": "a", "overrides": ["train.lr=1"]}, "sample.*"),
        (
            {"name": "x", "model": "a", "sweep": {"key": "sample.cfg", "values": [1]}, "variants": {"a": []}},
            "both sweep and variants",
        ),
        ({"name": "x", "model": "a", "run": "r"}, "run.r=DIR"),
    ],
)
def test_plan_errors_name_the_problem(tmp_path, row, message):
    with pytest.raises(ConfigError, match=message):
        study.expand(_plan(tmp_path, [row]), 1.0, {})


def test_select_rows_and_merge_split_a_plan_over_processes(tmp_path):
    plan = _plan(
        tmp_path,
        [
            {"name": "main", "model": "a", "n": 10},
            {"name": "main", "model": "b", "n": 10},
            {"name": "speed", "model": "a", "batch": 10},
            {"name": "speed", "model": "b", "batch": 10},
        ],
    )
    pick = study.select_rows
    assert [(r["model"], r["name"]) for r in pick(plan, ["a"], "quality")["rows"]] == [("a", "main")]
    assert [r["model"] for r in pick(plan, None, "speed")["rows"]] == ["a", "b"]
    assert len(pick(plan)["rows"]) == 4
    with pytest.raises(ConfigError, match="not in the plan"):
        pick(plan, ["c"])
    with pytest.raises(ConfigError, match="kinds"):
        pick(plan, None, "fast")
    assert [(r["model"], r["name"]) for r in pick(plan, ["a"], "all", ["main"])["rows"]] == [("a", "main")]
    assert [(r["model"], r["name"]) for r in pick(plan, None, "all", ["!main"])["rows"]] == [
        ("a", "speed"),
        ("b", "speed"),
    ]
    with pytest.raises(ConfigError, match="rows: \\['cfg'\\] not in the plan"):
        pick(plan, None, "all", ["cfg"])
    with pytest.raises(ConfigError, match="not both"):
        pick(plan, None, "all", ["main", "!speed"])
    parts = []
    for i, m in enumerate(["a", "b"]):
        rep = {"meta": {"date": f"d{i}", "ckpts": {m: f"/x/{m}"}}, "rows": [{"model": m}], "speed": []}
        parts.append(tmp_path / f"{m}.json")
        parts[-1].write_text(json.dumps(rep))
    speed = {"meta": {"date": "d2", "ckpts": {"a": "/x/a"}}, "rows": [], "speed": [{"model": "a"}]}
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    out = tmp_path / "all.json"
    never = tmp_path / "never_started.json"
    args = [f"merge={out}", *map(str, parts), str(never), str(tmp_path / "speed.json")]
    assert cli_main(["bench", "quality", *args]) == 0
    merged = json.loads(out.read_text())
    assert [r["model"] for r in merged["rows"]] == ["a", "b"] and merged["speed"] == [{"model": "a"}]
    assert merged["meta"]["ckpts"] == {"a": "/x/a", "b": "/x/b"} and len(merged["meta"]["parts"]) == 3
    assert cli_main(["bench", "quality", f"merge={out}", str(tmp_path / "none.json")]) == 2


STUDY_PRESETS = {"var": "var-fmnist", "hmar": "hmar-fmnist-finetune", "mar": "mar-fmnist-s",
                 "casmar": "casmar-fmnist-s"}  # fmt: skip


@pytest.mark.parametrize("plan_name", ["plan_var_hmar", "plan_mar_casmar", "plan_cpu_speed"])
def test_study_plans_are_valid_for_their_models(plan_name):
    """Every point's sample.* overrides build a valid config of its model (a typo or an invalid
    respacing string would otherwise surface on the GPU, minutes into a device call)."""
    from maskar.config import Config, apply_overrides, build, to_dict

    plan = study.load_plan(ROOT / "scripts" / "gpu" / "quality" / f"{plan_name}.yaml")
    scored = [r for r in plan["rows"] if r["name"] != "speed" and "run" not in r]
    points = study.expand({**plan, "rows": scored}, 1.0, {})
    checks = [(p.model, p.overrides) for p in points]
    checks += [(r["model"], [str(o) for o in r.get("overrides", [])]) for r in plan["rows"] if "run" in r]
    checks += [(r["model"], [str(o) for o in r.get("overrides", [])]) for r in study.speed_rows(plan)]
    for model, over in checks:
        built = build(Config, apply_overrides(to_dict(load_config(STUDY_PRESETS[model], [])), over))
        assert built.model.arch == model
    for m in {p.model for p in points if p.row == "main"}:  # a grid from the first seed only
        assert [p.grid for p in points if p.model == m and p.row == "main"] == [8, 0, 0]


def test_balanced_subset_is_interleaved():
    labels = [c for c in range(3) for _ in range(4)]  # class-major, as maskar sample writes
    idx = study._balanced_subset(labels, 6, 3)
    assert [labels[i] for i in idx] == [0, 1, 2, 0, 1, 2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step VAR on synthetic 16 px images, checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(
        "var-tiny",
        [
            f"train.out_dir={out}",
            "train.steps=2",
            "train.ckpt_every=1",
            "train.keep_last=5",
            "train.progress=false",
            "train.tensorboard=false",
            "model.num_classes=10",
            "device=cpu",
        ],
    )
    with pytest.warns(UserWarning, match="tokenizer_ckpt"):
        train(cfg)
    return out


@pytest.mark.skipif(not CLF.exists(), reason="classifier checkpoint not present")
def test_study_rows_and_their_eval_command_agree(tmp_path, tiny_run, capsys):
    plan = _plan(
        tmp_path,
        [
            {"name": "main", "model": "var", "n": 20, "seeds": [0, 1], "save": 10, "grid": 2},
            {"name": "cfg", "model": "var", "n": 10, "sweep": {"key": "sample.cfg", "values": [1.0, 3.0]}},
            {"name": "speed", "model": "var", "batch": 10, "reps": 1},
            {"name": "train_curve", "model": "var", "n": 10, "run": "var"},
        ],
    )
    rep = study.run_study(
        plan,
        {"var": str(tiny_run)},
        {"var": str(tiny_run)},
        {},
        tmp_path / "out",
        str(CLF),
        device="cpu",
        batch=7,
        tag="t",
    )
    saved = json.loads((tmp_path / "out" / "t.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rep["rows"]))
    assert [(r["row"], r["label"], r["seed"]) for r in rep["rows"]] == [
        ("main", "default", 0),
        ("main", "default", 1),
        ("cfg", "1.0", 0),
        ("cfg", "3.0", 0),
        ("train_curve", "1", 0),
        ("train_curve", "2", 0),
    ]
    for r in rep["rows"]:
        assert set(r["metrics"]) == {"FD_clf", "accuracy", "prec_clf", "recall_clf"}
        assert all(np.isfinite(v) for v in r["metrics"].values()) and r["images_per_s"] > 0
    assert rep["rows"][0]["metrics"] != rep["rows"][1]["metrics"]  # seeds differ
    sp = rep["speed"][0]
    assert sp["batch"] == 10 and sp["images_per_s"] > 0
    assert rep["rows"][0]["grid_png"] == "grid_var.png" and "grid_png" not in rep["rows"][1]  # seed 0 only
    from PIL import Image

    with Image.open(tmp_path / "out" / "grid_var.png") as im:  # 10 classes x 2 samples, a row per class
        assert im.size[1] > 10 * 16 and im.size[0] < 4 * 16 + 10
    with np.load(tmp_path / "out" / rep["rows"][0]["samples_npz"]) as d:
        assert d["arr_0"].shape == (10, 16, 16) and d["arr_0"].dtype == np.uint8
        assert d["arr_1"].tolist() == list(range(10))

    # The recorded command, run alone, gives the same numbers (same samples: seed and batch split).
    row = rep["rows"][3]
    args = shlex.split(row["command"])[2:]
    assert "sample.cfg=3.0" in args and "sample_batch_size=7" in args
    capsys.readouterr()
    out_json = tmp_path / "alone.json"
    assert cli_main(["eval", *args, "device=cpu", f"json={out_json}"]) == 0
    alone = {r["metric"]: r["value"] for r in json.loads(out_json.read_text())["results"]}
    for k, v in row["metrics"].items():
        assert alone[k] == pytest.approx(v, rel=1e-6, abs=1e-9)


@pytest.mark.skipif(not CLF.exists(), reason="classifier checkpoint not present")
def test_a_point_repeated_by_another_row_is_scored_once(tmp_path, tiny_run, monkeypatch):
    calls = []
    real = study.run_point

    def counting(model, cfg, p, *args):
        calls.append((p.row, p.label))
        return real(model, cfg, p, *args)

    monkeypatch.setattr(study, "run_point", counting)
    plan = _plan(
        tmp_path,
        [
            {"name": "cfg", "model": "var", "n": 10, "sweep": {"key": "sample.cfg", "values": [1.0, 3.0]}},
            # the same resolved setting as cfg 3.0, spelled differently, and once with samples kept
            {"name": "again", "model": "var", "n": 10, "overrides": ["sample.cfg=3"]},
            {"name": "kept", "model": "var", "n": 10, "save": 10, "overrides": ["sample.cfg=3.0"]},
        ],
    )
    rep = study.run_study(plan, {"var": str(tiny_run)}, {}, {}, tmp_path / "out", str(CLF), device="cpu",
                          batch=10, tag="t")  # fmt: skip
    assert calls == [("cfg", "1.0"), ("cfg", "3.0"), ("kept", "default")]
    again = rep["rows"][2]
    assert again["same_as"] == "cfg 3.0" and again["metrics"] == rep["rows"][1]["metrics"]
    assert "sample.cfg=3" in again["command"]  # its own command, which reproduces those numbers
    assert "same_as" not in rep["rows"][3] and rep["rows"][3]["metrics"] == rep["rows"][1]["metrics"]


def test_study_cli_checks_options(tmp_path):
    assert cli_main(["bench", "quality", "plan=x.yaml"]) == 2  # out / classifier missing
    assert cli_main(["bench", "quality", "plan=x.yaml", "out=o", "classifier=c", "scale=2"]) == 2
    assert cli_main(["bench", "quality", "bogus=1"]) == 2


def test_convert_dtype_writes_config_overrides(tmp_path, tiny_run):
    out = cast_checkpoint(tiny_run, tmp_path / "bf16", "bf16", True, ["sample.cfg=2.5", "data.root=/data/x"])
    model, cfg = load_model(out)
    assert cfg.sample.cfg == 2.5 and cfg.data.root == "/data/x"
    assert all(
        v.dtype == torch.bfloat16
        for v in load_tensors(out / "model.safetensors").values()
        if v.is_floating_point()
    )
    with pytest.raises(ConfigError, match="do not match"):
        cast_checkpoint(tiny_run, tmp_path / "bad", "bf16", True, ["model.width=32"])
    assert cli_main(["convert", "dtype", f"src={tiny_run}", f"out={tmp_path / 'x'}", "train.lr=1"]) == 2


def test_convert_dtype_shares_a_tokenizer_pinned_by_sha256(tmp_path, tiny_run, capsys):
    """``shared_tokenizer=DIR``: the written file holds no tokenizer.* weights, the model loads equal
    to the bundled one from DIR's (relative path: the two directories move together), and a changed
    or mismatched source is refused."""
    import shutil

    from maskar.checkpoint import CheckpointError, describe_checkpoint, save_tensors, update_checksums

    ship = tmp_path / "ship"
    a = cast_checkpoint(tiny_run, ship / "a", "bf16")
    b = cast_checkpoint(tiny_run, ship / "b", "bf16", shared_tokenizer=a)
    keys = load_tensors(b / "model.safetensors").keys()
    assert keys and not any(k.startswith("tokenizer.") for k in keys)
    moved = shutil.move(str(ship), str(tmp_path / "moved"))
    a, b = Path(moved) / "a", Path(moved) / "b"
    (ma, _), (mb, cb) = load_model(a), load_model(b)
    assert cb.model.tokenizer_ckpt == "../a"
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any("shared with" in line and "pinned file present" in line for line in describe_checkpoint(b))
    # another tokenizer (fp16 weights) cannot be shared with a bf16 one
    with pytest.raises(ConfigError, match="differs"):
        cast_checkpoint(tiny_run, tmp_path / "c", "fp16", shared_tokenizer=a)
    assert cli_main(["convert", "dtype", f"src={tiny_run}", f"out={tmp_path / 'd'}",
                     f"shared_tokenizer={tmp_path / 'nowhere'}"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    # the source rewritten (still a valid checkpoint itself): b refuses to load
    state = load_tensors(a / "model.safetensors")
    first = next(k for k in state if k.startswith("tokenizer."))
    state[first] = state[first] + 1
    update_checksums(a, {"model.safetensors": save_tensors(a / "model.safetensors", state)})
    load_model(a)
    with pytest.raises(CheckpointError, match="not the file it was written against"):
        load_model(b)
    assert any("MISSING or CHANGED" in line for line in describe_checkpoint(b))


def test_tokenizer_ckpt_may_name_a_generator_checkpoint(tmp_path, tiny_run):
    """VAR / HMAR take the tokenizer out of another generator's checkpoint (tokenizer.* keys)."""
    from maskar.registry import build_model

    cfg = load_config("hmar-tiny", [f"model.tokenizer_ckpt={tiny_run}"])
    model = build_model(cfg.model)
    model.init_pretrained()
    src = load_tensors(sorted(tiny_run.glob("step-*"))[-1] / "model.safetensors")
    for k, v in model.tokenizer.state_dict().items():
        assert torch.equal(v, src[f"tokenizer.{k}"]), k


def _shipped(name):
    return pytest.mark.skipif(
        not (ROOT / "checkpoints" / name / "model.safetensors").exists(),
        reason=f"checkpoints/{name} is made by the quality study (docs/quality.md); not present yet",
    )


@pytest.mark.parametrize(
    "name, arch",
    [
        pytest.param("casmar-fmnist", "casmar", marks=_shipped("casmar-fmnist")),
        pytest.param("mar-fmnist", "mar", marks=_shipped("mar-fmnist")),
    ],
)
def test_shipped_masked_demo_samples_on_cpu(name, arch):
    ckpt = ROOT / "checkpoints" / name
    assert (ckpt / "README.md").is_file()
    model, cfg = load_model(ckpt, device="cpu", arch=arch)
    assert cfg.model.tokenizer_ckpt is None  # self-contained
    assert model.num_classes == 10 if hasattr(model, "num_classes") else cfg.model.class_num == 10
    kw = dict(seed=3, num_iter=2, cfg=2.0, num_sampling_steps="5")
    if arch == "casmar":
        kw.update(scaffold_num_iter=4, refine_num_sampling_steps="5", re_cfg=2.0)
    else:
        kw.update(cuda_graph=False)
    labels = torch.tensor([1, 7])  # trouser, sneaker
    t = time.perf_counter()
    a = model.generate(labels, **kw)
    assert time.perf_counter() - t < 60
    assert a.shape == (2, 1, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, model.generate(labels, **kw))  # seeded
