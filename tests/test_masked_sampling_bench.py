"""`maskar bench casmar` / `bench mar` sampling cases on the CPU (the code paths the GPU run takes)."""

from __future__ import annotations

import json

import pytest
import torch

from maskar.bench import masked_sampling as ms
from maskar.bench.casmar import main as bench_casmar
from maskar.bench.kernel_time import group_of
from maskar.bench.mar import main as bench_mar


def test_bench_casmar_tiny_cpu_profile_and_json(tmp_path, capsys):
    out_json = tmp_path / "rows.json"
    argv = ["--preset", "casmar-tiny", "--device", "cpu", "--batch", "2", "--sample-reps", "1"]
    assert bench_casmar(argv + ["--profile", "--json", str(out_json), "--cuda-graph", "both"]) == 0
    out = capsys.readouterr().out
    assert "img/s" in out and "TFLOP/s" in out and "decode" in out
    assert out.count("\nsample num_iter=4 (8 scaffold) cfg=2.5 re_cfg=2.7") == 1  # CPU: eager only
    for phase in ("stage1/transformer", "stage1/mlp_head", "stage2/dit_head", "stage2/transformer"):
        assert f"| {phase} |" in out
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["flops"]["total"] == sum(v for k, v in row["flops"].items() if k != "total") > 0
    assert row["images_per_s"] > 0 and row["decode_ms"] > 0 and row["graphs"] is None
    assert set(row["profile"]["phases_ms"]) >= {"stage1/saliency", "stage2/saliency", "outside the phases"}


def test_bench_mar_sampling_flops_are_exact_and_methods_restored(tmp_path):
    out_json = tmp_path / "rows.json"
    argv = [
        "--preset",
        "mar-tiny",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--num-iters",
        "3",
        "--sample-reps",
        "1",
    ]
    assert bench_mar(argv + ["--train-batch", "0", "--profile", "--json", str(out_json)]) == 0
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["flops"]["head"] > 0 and row["flops"]["total"] == sum(
        v for k, v in row["flops"].items() if k != "total"
    )
    assert set(row["profile"]["phases_ms"]) == {"transformer", "mlp_head", "outside the phases"}


def test_bench_compile_variant_equals_eager_with_the_eager_backend(capsys):
    """--compile both: the uncompiled case, then model.compile_sampler() and the same case again,
    compared token for token (dynamo's eager backend runs the same ops: bit for bit)."""
    import torch._dynamo

    torch._dynamo.reset()
    argv = ["--preset", "casmar-tiny", "--device", "cpu", "--batch", "2", "--sample-reps", "1"]
    extra = ["--compile", "both", "--compile-backend", "eager", "--num-iters", "2", "--profile"]
    assert bench_casmar(argv + extra) == 0
    out = capsys.readouterr().out
    assert "[eager]" in out and "[eager+compiled]" in out
    assert "tokens vs eager (same seed): exact True" in out
    # the profile runs after the uncompiled case, before the compile (which may overrun a time limit)
    assert out.index("[eager]") < out.index("profile of one call") < out.index("[eager+compiled]")


def test_profile_ranges_are_removed_again():
    from test_mar import tiny_mar

    model = tiny_mar().eval()
    sampler = ms.mar_sampler(model, 2, 2, 2.0, "3")
    prof = ms.profile_call(sampler, torch.tensor([1, 2]), torch.device("cpu"), "fp32")
    assert prof["phases_ms"]["transformer"] > 0
    assert "forward_encoder" not in vars(model) and "sample" not in vars(model.diffloss)
    assert sampler.flops["head"] > 0  # the profiled call is a real (first, traced) sampling call


def test_kernels_are_filed_under_the_innermost_range_of_their_op():
    """The GPU profile's attribution against a brute-force search, on random nested ranges."""
    import random

    rng = random.Random(0)
    names = {"sampling", "stage1", "stage1/transformer", "stage1/mlp_head", "stage2", "stage2/dit_head"}

    def nest(lo, hi, prefix, depth):
        spans, t = [], lo
        kids = sorted(n for n in names if n.startswith(prefix + "/")) if prefix else ["stage1", "stage2"]
        while depth and kids and t < hi - 4:
            a = rng.randint(max(t, lo + 1), hi - 3)  # strictly inside the parent (real ranges are)
            b = rng.randint(a + 1, min(hi - 1, a + 40))
            name = rng.choice(kids)
            spans += [(a, b, name), *nest(a, b, name, depth - 1)]
            t = b + rng.randint(0, 3)  # siblings may touch: one ends where the next starts
        return spans

    spans = [(0, 400, "sampling"), *nest(0, 400, "", 2)]
    op_start = {i: rng.randint(-5, 405) for i in range(1, 300)}
    kernels = [(0, rng.randint(1, 9), "k", rng.randint(1, 320)) for _ in range(2000)]  # some unlinked

    def brute(t):
        inside = [s for s in spans if s[0] <= t < s[1] or (s[0] == t == s[1])]
        best = max(inside, key=lambda s: (s[0], -s[1]), default=None)  # the latest start is innermost
        return ms._phase_key(None if best is None else best[2], names)

    want: dict[str, float] = {}
    for _, end, _, linked in kernels:
        where = brute(op_start[linked]) if linked in op_start else "unattributed kernels"
        want[where] = want.get(where, 0.0) + end / 1e6
    got = ms._kernel_time_by_phase(spans, op_start, kernels, names)
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want)
    assert {"stage1/other", "stage1/transformer", "outside the phases", "unattributed kernels"} <= got.keys()
    # graph-replay kernels (linked to no op) by their own start time, when asked
    timed = [(s, s + rng.randint(1, 9), "k", linked) for s, (_, _, _, linked) in
             zip((rng.randint(0, 399) for _ in kernels), kernels)]  # fmt: skip
    want = {}
    for start, end, _, linked in timed:
        where = brute(op_start.get(linked, start))
        want[where] = want.get(where, 0.0) + (end - start) / 1e6
    got = ms._kernel_time_by_phase(spans, op_start, timed, names, unlinked_by_start=True)
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want)
    assert "unattributed kernels" not in got
    # split by kernel group: the same phases, each summed from its groups
    named = [(s, e, rng.choice(["nvjet_sm90_tst", "_na_fwd", "triton_per_fused_x", "memcpy"]), linked)
             for s, e, _, linked in timed]  # fmt: skip
    split = ms._kernel_time_by_phase(spans, op_start, named, names, unlinked_by_start=True,
                                     group=lambda n: group_of(n, ms.KERNEL_GROUPS))  # fmt: skip
    want = {}
    for start, end, name, linked in named:
        where = f"{brute(op_start.get(linked, start))} / {group_of(name, ms.KERNEL_GROUPS)}"
        want[where] = want.get(where, 0.0) + (end - start) / 1e6
    assert split.keys() == want.keys() and all(split[k] == pytest.approx(want[k]) for k in want)
    assert {k.split(" / ")[1] for k in split} == {"matmuls", "attention", "inductor kernels", "other"}


def test_idle_is_filed_under_the_range_open_when_each_gap_began():
    """GPU idle by phase against a brute-force walk over every nanosecond of a small timeline."""
    import random

    rng = random.Random(1)
    names = {"sampling", "stage1", "stage1/transformer", "stage2"}
    spans = [(0, 300, "sampling"), (10, 120, "stage1"), (20, 60, "stage1/transformer"),
             (130, 290, "stage2")]  # fmt: skip
    kernels = [(a, a + rng.randint(1, 12), "k", 0) for a in (rng.randint(-5, 310) for _ in range(40))]

    def innermost(t):
        inside = [sp for sp in spans if sp[0] <= t < sp[1]]
        best = max(inside, key=lambda sp: (sp[0], -sp[1]), default=None)
        return ms._phase_key(None if best is None else best[2], names)

    want: dict[str, float] = {}
    gap_start = None
    for t in range(0, 300):  # a ns is idle if no kernel covers it; a gap goes where it began
        if any(s <= t < e for s, e, _, _ in kernels):
            gap_start = None
            continue
        gap_start = t if gap_start is None else gap_start
        key = innermost(gap_start)
        want[key] = want.get(key, 0.0) + 1e-6
    got = ms._idle_by_phase(spans, kernels, names, 0, 300)
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want)
    assert {"stage1/other", "stage1/transformer", "stage2"} <= got.keys()


def test_union_of_intervals():
    assert ms._union_us([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4.0
    assert ms._union_us([]) == 0.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "0"], "--batch"),
        (["--num-iters", "a"], "--num-iters"),
        (["--preset", "mar-tiny"], "expected casmar"),
    ],
)
def test_bench_casmar_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_casmar(["--device", "cpu", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_targets_table_from_json_rows(tmp_path, capsys):
    def row(case, ips, graphs=True, compiled=False, **kw):
        return dict(case=case, images_per_s=ips, graphs=graphs, compiled=compiled, flops={"total": 1},
                    tflops_per_s=300.0, share_of_peak=0.38, **kw)  # fmt: skip

    cas = {"meta": {"preset": "casmar-b"}, "rows": [
        row("num_iter=4 (32 scaffold) cfg=2.5", 9.0),
        row("num_iter=4 (32 scaffold) cfg=2.5", 12.5, compiled=True,
            vs_first_variant={"variant": "graphs", "exact": False, "rel_max": 1e-3, "rel_mean": 1e-5}),
    ]}  # fmt: skip
    mar = {
        "meta": {"preset": "mar-b"},
        "rows": [row("num_iter=64 cfg=2.9", 21.0), row("num_iter=256 cfg=2.9", 5.5)],
    }
    (tmp_path / "c.json").write_text(json.dumps(cas))
    (tmp_path / "m.json").write_text(json.dumps(mar))
    ms.print_targets([str(tmp_path / "c.json"), str(tmp_path / "m.json"), str(tmp_path / "missing.json")])
    out = capsys.readouterr().out
    assert (
        "| CASMAR-B, official settings >= 11 img/s | 12.50 img/s" in out and "graphs+compiled) | yes |" in out
    )
    assert "| MAR-B num_iter 64 >= 20 img/s | 21.00 img/s" in out
    assert "| MAR-B num_iter 256 >= 6 img/s | 5.50 img/s" in out and "| NO |" in out
    assert "| CASMAR-B / MAR-B num_iter 256 >= 1.8 | 2.27 | yes |" in out
    assert "graphs+compiled vs graphs | exact False" in out and "(no rows in" in out


def test_compile_mode_reaches_the_blocks_only(monkeypatch):
    """--compile-mode is the transformer blocks' torch.compile mode; the heads keep theirs."""
    from maskar.models.mar import MAR

    calls: list[dict] = []

    def record(self, transformer=True, block_mode="default", head_mode="default", **kw):
        calls.append({"block_mode": block_mode, "head_mode": head_mode, **kw})

    monkeypatch.setattr(MAR, "compile_sampler", record)
    mode = "max-autotune-no-cudagraphs"
    argv = ["--preset", "mar-tiny", "--device", "cpu", "--batch", "2", "--sample-reps", "1",
            "--num-iters", "2", "--train-batch", "0", "--compile", "on", "--compile-mode", mode]  # fmt: skip
    assert bench_mar(argv) == 0
    assert calls == [{"block_mode": mode, "head_mode": "default", "backend": "inductor"}]
    with pytest.raises(SystemExit):
        bench_mar(argv[:-1] + ["fastest"])


def test_block_mode_is_passed_to_each_block(monkeypatch):
    from test_mar import tiny_mar

    model = tiny_mar()
    seen = []
    for blk in (*model.encoder_blocks, *model.decoder_blocks):
        monkeypatch.setattr(blk, "compile", lambda seen=seen, **kw: seen.append(kw))
    model.compile_sampler(transformer=True, block_mode="max-autotune-no-cudagraphs", backend="eager")
    assert len(seen) == len(model.encoder_blocks) + len(model.decoder_blocks)
    want = {"dynamic": True, "mode": "max-autotune-no-cudagraphs", "backend": "eager"}
    assert all(kw == want for kw in seen)


def test_linears_low_casts_before_timing_and_needs_no_training_rows(capsys):
    """--linears low: the model's linears in bf16 before the rows (as maskar sample on CUDA);
    on the CPU the bench runs fp32, so nothing is cast there; with training rows it is refused."""
    argv = ["--preset", "mar-tiny", "--device", "cpu", "--batch", "2", "--sample-reps", "1",
            "--num-iters", "2", "--linears", "low"]  # fmt: skip
    with pytest.raises(SystemExit):
        bench_mar(argv)  # the default --train-batch 64 trains
    assert "training rows need the fp32 weights" in capsys.readouterr().err
    assert bench_mar(argv + ["--train-batch", "0"]) == 0


def test_linears_low_casts_only_low_precision_runs():
    from test_mar import tiny_mar

    for precision, want in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]:
        model = tiny_mar()
        ms.apply_linears(model, "low", precision)
        assert model.z_proj.weight.dtype == want, precision
    model = tiny_mar()
    ms.apply_linears(model, "fp32", "bf16")
    assert model.z_proj.weight.dtype == torch.float32


def test_switches_reach_the_heads_and_the_mlps_and_are_reported(monkeypatch):
    """--time-table sets every MLP head's table switch; --linear-act sets the process-wide switch
    (env leaves it); both show in the header / JSON fields."""
    import argparse

    from test_casmar import tiny_casmar

    from maskar.nn import linear_gelu

    monkeypatch.setattr(linear_gelu, "TRITON", False)
    model = tiny_casmar()
    heads = [m for m in model.modules() if hasattr(type(m), "time_table")]
    assert heads  # CASMAR's stage-1 MLP head
    ms.apply_switches(model, argparse.Namespace(linear_act="env", time_table="off", defer_adds="off",
                                                fused_head="off"))
    assert all(m.time_table is False for m in heads) and linear_gelu.TRITON is False
    monkeypatch.setattr(linear_gelu, "ENABLED", None)  # each layer's default: the DiT MLPs' is on
    assert ms.switches(model) == {"linear_act": False, "fused_gelu_cublaslt": [True],
                                  "time_table": "False", "defer_adds": False, "fused_head": [False],
                                  "dit_modulate_kernel": False, "dit_residual_kernel": False,
                                  "psa_fused_qkv": False, "dit_low_residual": False}
    monkeypatch.setattr(type(heads[0]), "set_fused_blocks", lambda m, on: setattr(m, "fused_blocks", on))
    ms.apply_switches(model, argparse.Namespace(fused_head="on"))
    assert all(m.fused_blocks is True for m in heads)
    ms.apply_switches(model, argparse.Namespace(fused_head="off"))
    monkeypatch.setattr(linear_gelu, "load_kernel", lambda: None)  # the switch only
    ms.apply_switches(model, argparse.Namespace(linear_act="on", time_table="auto"))
    assert linear_gelu.TRITON is True and all(m.time_table == "auto" for m in heads)
    assert model.defer_residual_adds is True  # the default
    ms.apply_switches(model, argparse.Namespace(linear_act="off", time_table="on"))
    assert linear_gelu.TRITON is False and all(m.time_table is True for m in heads)


def test_profile_prints_the_unprofiled_idle_estimate(monkeypatch, capsys, tmp_path):
    """With kernel times (CUDA), the profile adds median - kernel busy time as the idle of an
    unprofiled call (the profiler slows the host, not the kernels)."""
    prof = {"wall_ms": 130.0, "clock": "GPU", "phases_ms": {"a": 90.0}, "idle_ms": 40.0, "kernels": 7,
            "busy_ms": 90.0, "idle_by_phase_ms": {}, "top_kernels_ms": []}
    monkeypatch.setattr(ms, "profile_call", lambda *a: dict(prof))
    monkeypatch.setattr(ms, "set_graphs", lambda *a: None)
    sampler = type("S", (), {"label": "case", "model": type("M", (), {"num_classes": 10})()})()
    rows = [{"case": "case", "graphs": True, "compiled": True, "median_ms": 100.0}]
    args = type("A", (), {"batch": 2, "json": str(tmp_path / "r.json")})()
    ms.profile_first(sampler, rows, args, torch.device("cpu"), "fp32", {})
    assert "GPU idle without the profiler, estimated: median 100 ms - kernels 90 ms = 10 ms (10.0%)" in \
        capsys.readouterr().out
    assert rows[0]["profile"]["idle_unprofiled_est_ms"] == 10.0
