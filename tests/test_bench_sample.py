"""maskar bench sample: tiny VAR / HMAR on the CPU (checks and table rows; no timing claims)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers_nextscale import randomize

from maskar.bench import sample as bench
from maskar.cli import main as cli_main
from maskar.config import load_config
from maskar.models.hmar import validate_mask_schedule
from maskar.sampling import autocast_for
from maskar.tokenizers.vqvae import PATCH_NUMS

CPU = torch.device("cpu")


def _opts(**kw):
    return bench._parse([f"{k}={v}" for k, v in dict(reps=1, warmup=0, **kw).items()])


@pytest.mark.parametrize(("preset", "passes"), [("var-tiny", 0), ("hmar-tiny", 4)])
def test_run_case_gives_finite_images_and_a_full_row(preset, passes):
    row, images = bench.run_case(preset, 16, 3, _opts(precision="fp32"), CPU)
    assert images.shape == (3, 3, 16, 16)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert set(bench.ROW_FIELDS) <= set(row)
    assert row["check_ok"] and row["deterministic"], row.get("check_failures")
    assert row["tf_rel_diff"] <= bench.TF_TOLERANCE["fp32"]
    assert (row["res"], row["batch"], row["L"]) == (16, 3, 1 + 4 + 9 + 16)
    assert row["images_per_s"] == pytest.approx(3 / (row["ms"] / 1e3))
    assert row["ms"] == pytest.approx(sorted(row["times_ms"])[0]) and row["first_s"] > 0
    assert row["peak_gb"] is None  # CPU
    # hmar-tiny is built as stage 2 so it refines with the preset's [[1],[1,3],[1,1,2,5],[16]].
    assert row["refine_passes"] == passes
    assert row["overrides"] == ([] if preset == "var-tiny" else ["model.stage=2"])


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["bench", "sample", "models=var-tiny,hmar-tiny", "cases=16x2", "reps=1", "warmup=0", f"json={out}"]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert bench.HEADER in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["var-d2", "hmar-d2"]
    assert all(r["check_ok"] and r["precision"] == "bf16" and r["batch"] == 2 for r in rows)
    assert all(bench.format_row(r) in text for r in rows)


def test_teacher_forced_check_catches_a_broken_kv_cache():
    model, cfg = bench.build_case("var-tiny", [], CPU, "auto")
    randomize(model)  # the official init leaves the blocks near identity; make attention matter
    knobs = bench.sampling_knobs(model, cfg, _opts())
    labels = torch.arange(2)
    with torch.no_grad():
        _, tokens = bench.generate_with_tokens(model, labels, 0, knobs)
    fp32 = autocast_for(CPU, "fp32")
    assert bench.teacher_forced_rel_diff(model, labels, tokens, knobs, fp32) < 1e-5
    model.uses_kv_cache = False  # each scale would see only itself: not VAR's block-causal model
    assert bench.teacher_forced_rel_diff(model, labels, tokens, knobs, autocast_for(CPU, "fp32")) > 1e-2


def test_d16_cases_use_the_official_1024_schedule_and_stage2_hmar():
    assert bench.case_overrides("var-d16", 256, 2) == []
    assert bench.case_overrides("hmar-d16", 256, 2) == ["model.stage=2"]
    over = bench.case_overrides("hmar-d16", 1024, 2)
    cfg = load_config("hmar-d16", over)
    assert cfg.model.stage == 2 and tuple(cfg.model.tokenizer.patch_nums) == PATCH_NUMS[1024]
    assert sum(p * p for p in cfg.model.tokenizer.patch_nums) == 9451
    for pn, table in bench.OFFICIAL_BENCH_SCHEDULES.items():
        validate_mask_schedule(table, pn)  # each entry sums to pn^2
    assert bench.refine_passes(bench.OFFICIAL_BENCH_SCHEDULES[PATCH_NUMS[1024]], PATCH_NUMS[1024]) == 6


def test_row_lines_up_with_the_header_and_holds_only_this_run():
    # Figures of another run or GPU (the official code's) are not printed beside ours (issue 19).
    row = dict.fromkeys(bench.ROW_FIELDS)
    row.update(model="hmar-d16", mode="fast", res=256, batch=64, precision="bf16", L=680, params_m=467.7,
               ms=624.0, floor_ms=61.2, images_per_s=102.6, peak_gb=5.0, peak_reserved_gb=5.5,
               memory_floor_gb=1.87, first_s=2.0, refine_passes=4, tf_rel_diff=1e-3,
               check_ok=True)  # fmt: skip
    line = bench.format_row(row)
    assert len(line) == len(bench.HEADER)
    want = "hmar-d16 fast 256 64 bf16 680 467.7M 624.0 61.2 102.6 5.00 5.50 1.87 2.00 4 1.0e-03 ok"
    assert line.split() == want.split()
    assert "peer" not in bench.HEADER and not any(f.startswith("peer") for f in bench.ROW_FIELDS)


@pytest.mark.parametrize(
    "argv",
    [
        ["nope=1"],
        ["precision=int8"],
        ["schedule=mine"],
        ["reps=0"],
        ["noequals"],
        ["modes=turbo"],
        ["large_n=-1"],
        ["modes=compiled,fast"],
        ["modes=fast-w16,fast"],
        ["modes=compiled,fast-w16"],
        ["modes=compiled-w16,compiled"],
        ["modes=fast-w16", "precision=fp32"],
        ["compile_mode=fastest"],
        ["fresh_compile=maybe"],
    ],
)
def test_bad_arguments_stop_with_a_message(argv):
    with pytest.raises(SystemExit, match="bench sample"):
        bench._parse(argv)


def test_bad_case_spec_and_resolution():
    with pytest.raises(SystemExit, match="RESxBATCH"):
        bench.parse_cases("256")
    assert bench.parse_cases("256x64, 1024x8") == [(256, 64), (1024, 8)]
    with pytest.raises(SystemExit, match="official patch schedule"):
        bench.case_overrides("var-d16", 300, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["var-tiny", "hmar-tiny"])
def test_gpu_checks_pass_in_bf16(preset):
    row, images = bench.run_case(preset, 16, 4, _opts(), torch.device("cuda"))
    assert row["check_ok"], row.get("check_failures")
    assert images.is_cuda and images.shape == (4, 3, 16, 16)
    assert row["peak_gb"] > 0


def test_modes_profile_agreement_and_large_n_on_the_cpu(capsys, tmp_path):
    """One tiny HMAR in every mode with the diagnostics on: rows check, regions cover the scales."""
    out = tmp_path / "rows.json"
    argv = ["models=hmar-tiny", "cases=16x2", "modes=legacy,eager,fast", "reps=1", "warmup=0", "profile=true",
            "agree=true", "large_n=6", "device=cpu", f"json={out}"]  # fmt: skip
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["mode"] for r in rows] == ["legacy", "eager", "fast"] and all(r["check_ok"] for r in rows)
    for r in rows:
        reg = r["profile"]["regions"]
        assert sorted(reg["per_scale_ms"]) == ["s00", "s01", "s02", "s03"]
        assert reg["per_kind_ms"]["refine"] > 0 and reg["per_kind_ms"]["decode"] > 0
        assert reg["per_kind_ms"]["prep"] > 0  # the host's work before the first scale, apart
        assert r["tflop"] > 0 and r["floor_ms"] > 0
    agree = rows[2]["agree"]
    assert 0 <= agree["token_agreement"] <= 1 and agree["decode_only_psnr_db"] > 25
    assert data["large_n"]["images"] == 6 and data["large_n"]["shape"] == [6, 16, 16, 3]
    assert "large-N" in capsys.readouterr().out


def test_compiled_mode_runs_after_fast_and_checks(monkeypatch, tmp_path):
    """modes=fast,compiled: the compiled row (model.compile_sampler(), here with Dynamo's eager
    backend: the CPU has no time for Inductor) passes every check of the row."""
    from maskar.models import var as var_mod

    compile_sampler = var_mod.NextScaleModel.compile_sampler
    calls = []

    def eager_backend(self, **kw):
        calls.append(1)
        compile_sampler(self, backend="eager")

    monkeypatch.setattr(var_mod.NextScaleModel, "compile_sampler", eager_backend)
    out = tmp_path / "rows.json"
    argv = ["models=var-tiny", "cases=16x2", "modes=fast,compiled", "reps=1", "warmup=0", "device=cpu",
            f"json={out}"]  # fmt: skip
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["fast", "compiled"] and all(r["check_ok"] for r in rows)
    assert calls == [1]
    assert rows[1]["dynamo"]["graphs"] >= 2 and rows[1]["dynamo"]["recompile_limit_hits"] == 0
    assert "dynamo" not in rows[0]


@pytest.mark.parametrize("fresh", [True, False])
def test_each_model_compiles_afresh_unless_told_otherwise(monkeypatch, tmp_path, fresh):
    """Several models with a compiled mode: Dynamo is reset before each model is built
    (fresh_compile=true, the default), so no model times code compiled for another; not at all
    for fresh_compile=false or without a compiled mode."""
    from maskar.models import var as var_mod

    compile_sampler = var_mod.NextScaleModel.compile_sampler
    monkeypatch.setattr(
        var_mod.NextScaleModel, "compile_sampler", lambda self, **kw: compile_sampler(self, backend="eager")
    )
    events = []
    reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (events.append("reset"), reset()))
    build = bench.build_case
    monkeypatch.setattr(bench, "build_case", lambda preset, *a: (events.append(preset), build(preset, *a))[1])
    argv = ["models=var-tiny,hmar-tiny", "cases=16x2", "modes=compiled", "reps=1", "warmup=0",
            "device=cpu", "check=false", f"fresh_compile={str(fresh).lower()}",
            f"json={tmp_path / 'rows.json'}"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bench.main(argv) == 0
    assert events == (["reset", "var-tiny", "reset", "hmar-tiny"] if fresh else ["var-tiny", "hmar-tiny"])
    # without the reset the second model reuses the first one's compiled code, and is told so
    assert any("compile_sampler" in str(w.message) for w in caught) is (not fresh)
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["compiled", "compiled"] and all("dynamo" in r for r in rows)
    events.clear()
    assert bench.main(argv[:2] + ["modes=fast", "reps=1", "warmup=0", "device=cpu", "check=false"]) == 0
    assert events == ["var-tiny", "hmar-tiny"]


def test_w16_mode_samples_what_fast_samples(tmp_path):
    """modes=fast,fast-w16 on one model: the linears cast once to the autocast dtype give the same
    images as the fast row, and every row check passes (CPU, bf16 autocast)."""
    opts = bench._parse(["models=var-tiny", "cases=16x2", "modes=fast,fast-w16", "reps=1", "warmup=0",
                         "device=cpu"])  # fmt: skip
    device = torch.device("cpu")
    overrides = bench.case_overrides("var-tiny", 16, int(opts["hmar_stage"]))
    built = (*bench.build_case("var-tiny", overrides, device, str(opts["backend"])), overrides)
    fast, img_fast = bench.run_case("var-tiny", 16, 2, opts, device, "fast", built)
    w16, img_w16 = bench.run_case("var-tiny", 16, 2, opts, device, "fast-w16", built)
    assert fast["check_ok"] and w16["check_ok"], (fast.get("check_failures"), w16.get("check_failures"))
    assert built[0].head.weight.dtype == torch.bfloat16
    assert torch.equal(img_fast, img_w16)


def test_memory_by_pool_splits_default_and_graph_pools():
    segs = [{"segment_pool_id": (0, 0), "total_size": 2e9, "allocated_size": 1e9},
            {"segment_pool_id": (1, 3), "total_size": 4e9, "allocated_size": 3.5e9},
            {"segment_pool_id": [1, 4], "total_size": 1e9, "allocated_size": 0}]
    assert bench.memory_by_pool(segs) == {"default_reserved": 2.0, "default_in_use": 1.0,
                                          "graphs_reserved": 5.0, "graphs_in_use": 3.5,
                                          "default_segments": 1, "default_largest_gb": [2.0],
                                          "graphs_segments": 2, "graphs_largest_gb": [4.0, 1.0]}
    assert bench.memory_by_pool([])["graphs_reserved"] == 0.0
    line = bench.format_pools(bench.memory_by_pool(segs))
    assert "graphs' pools 5.00 GB (3.50 in use) in 2 segments, the largest 4.00, 1.00 GB" in line


def test_profile_groups_the_graphed_calls_kernels_by_name():
    """profile=true's kernel groups: cuDNN's attention (``..._flash_fprop_...``) and Inductor's
    kernels named after a convolution they follow before the convolutions, cuDNN's convolutions
    (implicit GEMMs) before the matmuls, the draw, the norm and q/k norm kernels."""
    from maskar.bench.sample import group_kernels

    per = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": 5.0,
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": 4.0,
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNN": 1.0,
        "_categorical": 0.5, "_gn_apply": 0.25, "_qk_norm_fwd": 0.125,
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": 2.0,
        "triton_poi_fused_add_mul_0": 0.75, "void at::native::elementwise_kernel<128, 2>": 0.0625,
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64": 1.0,
        "triton_poi_fused__to_copy_convolution_64": 0.25,
    }  # fmt: skip
    got = group_kernels(per)
    assert got == pytest.approx({
        "decoder convolutions": 5.0, "layout transposes": 0.0, "fused group norm": 0.25, "attention": 3.0,
        "q/k norm": 0.125, "draw (top-k / top-p)": 0.5, "matmuls": 5.0, "inductor kernels": 1.0,
        "other": 0.0625,
    })  # fmt: skip
