"""Block-sparse attention kernel (maskar.kernels.block_sparse) and the flex / varlen backends.

Every check compares out, dq, dk, dv with fp32 SDPA + boolean mask on fresh random inputs
given as strided views of a fused (B, L, 3, H, D) qkv, the model's layout.

On CPU the Triton kernels run under TRITON_INTERPRET=1 in ONE subprocess (the variable
must be set before triton is imported, and other test modules may already have imported
it here); the parametrised tests read its results. GPU tests are marked ``gpu``.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers_aot import compile_attention_kernel, compiles_as_launched, require_aot_compiler
from helpers_interpreter import run_under_interpreter

from maskar.nn.attention import ScalePattern, attention, auto_backend_name, available_backends, sdpa_attention

SIDES_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
SIDES_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
SIDES_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
TOL = {"fp16": 3e-3, "bf16": 2.5e-2}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# (name, lengths, B, H, D, scale, interpreter block size); small enough for the CPU interpreter
INTERPRET_CASES = [
    ("256px", tuple(s * s for s in SIDES_256), 1, 1, 32, None, 64),
    ("512px_first7", tuple(s * s for s in SIDES_512[:7]), 1, 1, 64, None, 32),
    ("1024px_first8_d128_scale1", tuple(s * s for s in SIDES_1024[:8]), 1, 1, 128, 1.0, 32),
    ("custom_odd", (3, 1, 17, 40, 5), 2, 2, 32, 0.3, 16),
    ("single_scale", (50,), 1, 2, 64, None, 16),
    ("256px_tiles128", tuple(s * s for s in SIDES_256), 1, 1, 64, None, 128),  # the long-sequence tile size
]
KINDS = ("block_diagonal", "block_causal")
# (aligned tiles, grid order B*H-fast) per interpreter case
TILING = {"256px": (True, False), "512px_first7": (False, True), "1024px_first8_d128_scale1": (True, True),
          "custom_odd": (True, False), "single_scale": (False, False), "256px_tiles128": (True, False)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm().clamp_min(1e-30))


def errors_vs_reference(fn, pattern: ScalePattern, B: int, H: int, D: int, dtype, scale, device) -> dict:
    """Relative errors of out / dq / dk / dv of ``fn`` vs fp32 SDPA, plus layout facts."""
    L = pattern.total
    qkv = torch.randn(B, L, 3, H, D, dtype=dtype, device=device)  # (B, L, 3, H, D), model layout
    qkv.requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, L, D) strided views
    out = fn(q, k, v, pattern, scale)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    ref = sdpa_attention(*ref_in, pattern, scale)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    res = {"out": _rel(out, ref)}
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        res[name] = _rel(g, r)
    res["finite"] = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    res["out_blhd"] = out.transpose(1, 2).is_contiguous()  # free reshape to (B, L, H*D) in the model
    return res


# ----------------------------------------------------------------------------- pure-torch pieces


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lengths", [tuple(s * s for s in SIDES_256), (3, 1, 17, 40, 5), (7,)])
def test_bounds_reproduce_dense_mask(kind, lengths):
    pytest.importorskip("triton")
    from maskar.kernels.block_sparse import _bounds

    p = ScalePattern(kind, lengths)
    b = _bounds(p, "cpu").long()
    j = torch.arange(p.total)
    by_rows = (j[None, :] >= b[0][:, None]) & (j[None, :] < b[1][:, None])  # [i, j] from kv bounds of i
    by_cols = (j[:, None] >= b[2][None, :]) & (j[:, None] < b[3][None, :])  # [i, j] from q bounds of j
    dense = p.dense_mask()
    assert torch.equal(by_rows, dense)
    assert torch.equal(by_cols, dense)


def test_supports_is_false_on_cpu_without_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter enabled in this process")
    p = ScalePattern.from_sides("block_diagonal", (1, 2))
    q = torch.randn(1, 1, 5, 64, dtype=torch.float16)
    for mod in ("maskar.kernels.block_sparse", "maskar.nn.attention_flex", "maskar.nn.attention_varlen"):
        try:
            m = __import__(mod, fromlist=["supports"])
        except ImportError:
            continue
        assert m.supports(q, q, q, p) is False, mod


def test_backends_registered():
    names = available_backends()
    assert names[-1] == "sdpa"
    for mod, name in (("triton", "triton"), ("torch.nn.attention.varlen", "varlen")):
        try:
            __import__(mod)
        except ImportError:
            continue
        assert name in names


def test_varlen_cu_seqlens():
    mod = pytest.importorskip("maskar.nn.attention_varlen")
    cu = mod._cu_seqlens(ScalePattern("block_diagonal", (1, 4, 9)), 2, "cpu")
    assert cu.tolist() == [0, 1, 5, 14, 15, 19, 28]
    assert cu.dtype == torch.int32


# ----------------------------------------------------------------------------- CPU: Triton interpreter

_RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
import test_kernels as T
import maskar.kernels.block_sparse as bs
from maskar.nn.attention import ScalePattern
torch.manual_seed(0)
for name, lengths, B, H, D, scale, blk in T.INTERPRET_CASES:
    # scale-aligned and uniform tiles, both grid orders
    aligned, bh_fast = T.TILING[name]
    bs.FORCE_FWD_CONFIG = bs.FwdConfig(blk, blk, 4, 1, aligned=aligned, bh_fast=bh_fast)
    # the separate delta launch and the split dK/dV + dQ launches run on some cases, the
    # fused single launch on the others
    bs.FORCE_BWD_CONFIG = bs.BwdConfig(blk, blk, blk, blk, 4, 1, fused_delta=name != "custom_odd",
                                       dq_warps=4 if name in ("512px_first7", "custom_odd") else 0,
                                       aligned=aligned, bh_fast=bh_fast)
    for kind in T.KINDS:
        for dname, dtype in T.DTYPES.items():
            p = ScalePattern(kind, lengths)
            x = torch.empty(B, H, p.total, D, dtype=dtype)
            assert bs.supports(x, x, x, p)
            r = T.errors_vs_reference(bs.block_sparse_attention, p, B, H, D, dtype, scale, "cpu")
            print("RESULT " + json.dumps({{"case": f"{{name}}-{{kind}}-{{dname}}", **r}}), flush=True)
# the public API reaches the kernel: auto picks it here (interpreter on), explicit name too
from maskar.nn.attention import attention
p = ScalePattern("block_causal", (1, 4, 9))
q = torch.randn(1, 2, 14, 32, dtype=torch.float16)
ref = bs.block_sparse_attention(q, q, q, p)
same = [bool(torch.equal(attention(q, q, q, p, backend=b), ref)) for b in ("triton", "auto")]
print("RESULT " + json.dumps({{"case": "api", "same": same}}), flush=True)
"""


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    pytest.importorskip("triton")
    return run_under_interpreter(_RUNNER, timeout=300)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", [c[0] for c in INTERPRET_CASES])
def test_kernel_matches_fp32_sdpa_interpreted(interpreter_results, case, kind, dname):
    r = interpreter_results[f"{case}-{kind}-{dname}"]
    assert r["finite"]
    assert r["out_blhd"]
    for t in ("out", "dq", "dk", "dv"):
        assert r[t] < TOL[dname], (t, r)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize(
    "lengths,block",
    [(tuple(s * s for s in SIDES_256), 64), ((3, 1, 17, 40, 5), 16), ((200, 1, 2), 32), ((7,), 16)],
)
def test_work_items_cover_every_row_and_column_once(lengths, block, aligned, kind):
    """Forward row tiles and backward key / query tiles: each token once, at most one block,
    aligned tiles never cut a scale except at multiples of the block from its start; the
    tables are sorted by the work they walk (costliest first)."""
    pytest.importorskip("triton")
    from maskar.kernels.block_sparse import BwdConfig, _bound_lists, _bwd_table, _row_items, _steps

    p = ScalePattern(kind, lengths)
    L = p.total
    starts = torch.tensor(lengths).cumsum(0) - torch.tensor(lengths)
    scale_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def check(spans, size):
        seen = torch.zeros(L, dtype=torch.long)
        for a, b in spans:
            assert 0 <= a < b <= L and b - a <= size
            seen[a:b] += 1
            if aligned:
                for t in range(a + 1, b):  # a tile crosses into a scale only at that scale's start,
                    if scale_of[t] != scale_of[t - 1]:  # and then holds it whole
                        assert lengths[scale_of[t]] <= size and t - 1 < a + size
                if scale_of[a] == scale_of[max(a - 1, 0)] and a > 0:  # starts mid-scale: block offset
                    assert (a - int(starts[scale_of[a]])) % size == 0
        assert torch.equal(seen, torch.ones(L, dtype=torch.long))

    ks, ke, qs, qe = _bound_lists(p)
    start, stop = _row_items(p, block, 16, aligned, "cpu").tolist()
    check(list(zip(start, stop)), block)
    cost = [_steps(ks, ke, a, b, 16) for a, b in zip(start, stop)]
    assert cost == sorted(cost, reverse=True)
    cfg = BwdConfig(16, block, block // 2 if block > 16 else block, 16, 4, 1, aligned=aligned)
    kinds, start, stop = _bwd_table(p, cfg, 0, "cpu").tolist()
    check([(a, b) for k, a, b in zip(kinds, start, stop) if k == 1], cfg.block_n1)
    check([(a, b) for k, a, b in zip(kinds, start, stop) if k == 2], cfg.block_m2)
    for part in (1, 2):
        only = _bwd_table(p, cfg, part, "cpu").tolist()
        assert set(only[0]) == {part}
        assert sorted(zip(*only)) == sorted((k, a, b) for k, a, b in zip(kinds, start, stop) if k == part)


def test_aligned_tiles_visit_less_of_the_masked_area():
    """At the 256 px schedule aligned 64-token tiles walk 1.19x the allowed pairs, uniform 1.52x."""
    pytest.importorskip("triton")
    from maskar.kernels.block_sparse import _bound_lists, _row_items, _steps

    p = ScalePattern.from_sides("block_diagonal", SIDES_256)
    ks, ke, _, _ = _bound_lists(p)
    allowed = sum(n * n for n in p.lengths)
    area = {}
    for aligned in (True, False):
        start, stop = _row_items(p, 64, 64, aligned, "cpu").tolist()
        area[aligned] = sum(_steps(ks, ke, a, b, 64) for a, b in zip(start, stop)) * 64 * 64 / allowed
    assert round(area[True], 2) == 1.19 and round(area[False], 2) == 1.52


def test_tuning_picks_fastest_candidate_and_later_calls_launch_once_per_phase(monkeypatch):
    """The host path without a GPU: launches recorded, candidate timings faked (each timed
    candidate faster than the one before, so the last wins); the plan is cached and reused."""
    pytest.importorskip("triton")
    import maskar.kernels.block_sparse as bs

    launches = []
    timings = iter(range(1000, 0, -1))

    def fake_time(launch, rounds=5, per_round=8):
        launch()
        return float(next(timings))

    monkeypatch.setattr(bs, "_launch", lambda kernel, *args, **kw: launches.append(kernel))
    monkeypatch.setattr(bs, "_time_ms", fake_time)
    monkeypatch.setattr(bs, "_INTERPRET", False)
    for name in ("_plans", "_tuned", "_tune_log"):
        monkeypatch.setattr(bs, name, {})
    p = ScalePattern.from_sides("block_causal", SIDES_256)
    qkv = torch.randn(2, p.total, 3, 3, 64, dtype=torch.float16, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    counts = []
    for _ in range(2):
        before = len(launches)
        out = bs._BlockSparseAttention.apply(q, k, v, p, 0.125)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        counts.append(len(launches) - before)
    fwd, bwd = bs._fwd_candidates(64), bs._bwd_candidates(64)
    chosen = {key[0]: cfg for key, cfg in bs.tuned_configs().items()}
    assert chosen == {"fwd": fwd[-1], "bwd": bwd[-1]}

    def n_bwd(c):  # split configs are two launches, an unfused delta one more
        return (2 if c.dq_warps else 1) + (0 if c.fused_delta else 1)

    assert counts[0] == len(fwd) + 1 + sum(n_bwd(c) for c in bwd) + n_bwd(bwd[-1])
    assert counts[1] == 1 + n_bwd(bwd[-1])
    assert launches[-1 - n_bwd(bwd[-1])] is bs._attn_fwd and launches[-1] is bs._attn_bwd
    assert len(bs._plans) == 2


def test_direct_launch_path_reuses_compiled_kernel_only_for_the_same_specialisation(monkeypatch):
    """_launch: first call through kernel[grid](...), repeats straight to the compiled kernel's
    launcher (Triton 3.6 convention: grid x, y, z, stream, function, metadata, launch metadata,
    enter / exit hooks, then every parameter in order); with launch hooks registered, through
    the compiled kernel's runner; a new specialisation or a launcher error goes back to JIT."""
    pytest.importorskip("triton")
    import maskar.kernels.block_sparse as bs

    calls = []

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def __init__(self, fail=False):
            self.fail = fail

        def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *args):
            if self.fail:
                raise TypeError("other launcher convention")
            expected = (7, "fn", "meta", None, None, None)
            assert (stream, function, metadata, launch_metadata, enter, exit_) == expected
            calls.append(("direct", (gx, gy, gz), args))

        def __getitem__(self, grid):
            assert len(grid) == 3  # Triton's CompiledKernel runner reads grid[0], grid[1], grid[2]

            def run(*args):
                calls.append(("runner", grid, args))
            return run

    class Kernel:
        arg_names = ["X", "n", "s", "BLOCK"]

        def __init__(self, fail=False):
            self.fail = fail

        def __getitem__(self, grid):
            def run(*args, **kw):
                calls.append(("jit", grid, args, kw))
                return Compiled(self.fail)
            return run

    monkeypatch.setattr(bs, "_INTERPRET", False)
    monkeypatch.setattr(bs, "FAST_LAUNCH", True)
    monkeypatch.setattr(bs, "_compiled", {})
    monkeypatch.setattr(bs, "_fast_failed", False)
    monkeypatch.setattr(bs, "_current_stream", lambda: 7)
    x = torch.zeros(64)
    kern = Kernel()
    bs._launch(kern, (3, 1), (x, 32, 0.5), {"BLOCK": 16}, 4, 2)
    bs._launch(kern, (5, 1), (x, 32, 0.7), {"BLOCK": 16}, 4, 2)  # only a float changed: direct
    bs._launch(kern, (5, 1), (x, 1, 0.7), {"BLOCK": 16}, 4, 2)  # another int (== 1 is specialised): JIT
    bs._launch(kern, (5, 1), (x, 32, 0.7), {"BLOCK": 32}, 4, 2)  # another constexpr: JIT again
    bs._launch(kern, (5, 1), (x.half(), 32, 0.7), {"BLOCK": 16}, 4, 2)  # another dtype: JIT again
    bs._launch(kern, (5, 1), (x[1:], 32, 0.7), {"BLOCK": 16}, 4, 2)  # pointer not 16-byte aligned: JIT
    monkeypatch.setattr(bs, "_launch_hooks_set", lambda: True)
    bs._launch(kern, (5, 1), (x, 32, 0.7), {"BLOCK": 16}, 4, 2)  # hooks registered: the runner
    assert [c[0] for c in calls] == ["jit", "direct", "jit", "jit", "jit", "jit", "runner"]
    assert calls[0][3] == {"BLOCK": 16, "num_warps": 4, "num_stages": 2, "enable_fp_fusion": True}
    assert calls[1][1] == (5, 1, 1) and calls[1][2] == (x, 32, 0.7, 16)
    assert calls[-1][1] == (5, 1, 1) and calls[-1][2] == (x, 32, 0.7, 16)
    assert not bs._fast_failed
    calls.clear()
    monkeypatch.setattr(bs, "_compiled", {})
    monkeypatch.setattr(bs, "_launch_hooks_set", lambda: False)
    bad = Kernel(fail=True)
    for _ in range(3):
        bs._launch(bad, (1,), (x, 32, 0.5), {"BLOCK": 16}, 4, 2)
    assert [c[0] for c in calls] == ["jit", "jit", "jit"] and bs._fast_failed


def test_launch_hooks_detection():
    pytest.importorskip("triton")
    import maskar.kernels.block_sparse as bs

    if bs._knobs is None:
        pytest.skip("this Triton has no knobs module")
    assert bs._launch_hooks_set() is False
    hook = bs._knobs.runtime.launch_enter_hook
    if not hasattr(hook, "add"):
        pytest.skip("launch hooks are not HookChains in this Triton")
    fn = lambda metadata: None  # noqa: E731
    hook.add(fn)
    try:
        assert bs._launch_hooks_set() is True
    finally:
        hook.remove(fn)


@pytest.mark.parametrize(
    "arch,dtype,phase,part,fused",
    [(90, "fp16", "fwd", 0, True), (90, "fp16", "bwd", 0, True), (90, "bf16", "bwd", 1, False),
     (90, "bf16", "bwd", 2, True), (80, "bf16", "fwd", 0, True)],
)
def test_kernels_compile_to_cubin_without_a_gpu(arch, dtype, phase, part, fused):
    """The interpreter does not compile: this catches what only the real compiler rejects
    (Hopper and Ampere targets, both dtypes, one-launch and split backward)."""
    require_aot_compiler()
    import maskar.kernels.block_sparse as bs

    if phase == "fwd":
        kernel = bs._attn_fwd
        consts = dict(BLOCK_M=64, BLOCK_N=32, HEAD_DIM=64, BH_FAST=False, DOT_F32=False)
    else:
        kernel = bs._attn_bwd
        consts = dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, HEAD_DIM=64, FUSED_DELTA=fused,
                      PART=part, BH_FAST=False, DOT_F32=False)
    try:
        compiled = compile_attention_kernel(kernel, arch, dtype, consts)
    except FileNotFoundError as e:  # no ptxas in this Triton build
        pytest.skip(f"no CUDA toolchain in this Triton: {e}")
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0


def test_compiles_as_launched_specialises_like_the_launcher():
    """``helpers_aot.compiles_as_launched`` (behind every spill reading): a launch with aligned
    tensors and ints divisible by 16 compiles with those facts (vector loads), one without does
    not; nothing runs."""
    require_aot_compiler()
    import triton
    import triton.language as tl

    @triton.jit
    def copy(X, Y, stride, BLOCK: tl.constexpr):
        rows = tl.arange(0, BLOCK)
        cols = tl.arange(0, 64)
        x = tl.load(X + rows[:, None] * stride + cols[None, :])
        tl.store(Y + rows[:, None] * stride + cols[None, :], x)

    x = torch.randn(16, 64)
    with compiles_as_launched() as found:
        copy[(1,)](x, torch.empty_like(x), 64, BLOCK=16, enable_fp_fusion=True)  # as maskar launches
        odd = torch.randn(16 * 65 + 1)[1:].as_strided((16, 64), (65, 1))  # offset 4 bytes, stride 65
        copy[(1,)](odd, torch.empty(16, 65), 65, BLOCK=16, enable_fp_fusion=True)
    (name, aligned), (_, unaligned) = found
    assert name == "copy"
    assert "ld.global.v4" in aligned.asm["ptx"] and "ld.global.v4" not in unaligned.asm["ptx"]
    with pytest.raises(AssertionError, match="enable_fp_fusion"), compiles_as_launched():
        copy[(1,)](x, torch.empty_like(x), 64, BLOCK=16)  # Triton's default, which 3.10 changes


def test_attention_api_dispatches_to_kernel_interpreted(interpreter_results):
    assert interpreter_results["api"]["same"] == [True, True]


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "sides,B,H,D,scale",
    [
        (SIDES_256, 4, 3, 64, None),
        (SIDES_512, 2, 3, 64, None),
        (SIDES_1024, 1, 2, 64, None),
        (SIDES_256, 2, 2, 32, 1.0),
        (SIDES_512, 2, 2, 128, 1.0),
        ((1, 2, 3, 4, 5, 7, 9), 3, 5, 64, 0.5),
    ],
)
def test_kernel_matches_fp32_sdpa_gpu(sides, B, H, D, scale, kind, dname):
    import maskar.kernels.block_sparse as bs

    p = ScalePattern.from_sides(kind, sides)
    # pinned configs keep this test free of autotuning (tuning is covered below)
    bs.FORCE_FWD_CONFIG, bs.FORCE_BWD_CONFIG = bs._fwd_candidates(D)[0], bs._bwd_candidates(D)[0]
    try:
        r = errors_vs_reference(bs.block_sparse_attention, p, B, H, D, DTYPES[dname], scale, "cuda")
    finally:
        bs.FORCE_FWD_CONFIG = bs.FORCE_BWD_CONFIG = None
    assert r["finite"] and r["out_blhd"]
    for t in ("out", "dq", "dk", "dv"):
        assert r[t] < TOL[dname], (t, r)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_every_candidate_config_is_correct_gpu(kind):
    """Autotuning may pick any candidate: each must be right (one that cannot compile is skipped by it)."""
    from triton.runtime.errors import OutOfResources

    import maskar.kernels.block_sparse as bs

    try:
        # head dims 32 / 128 run their first candidates in the test above; the long-sequence
        # candidates (1024 px) on the 1024 px schedule
        for D, sides, long in ((64, SIDES_256, False), (64, SIDES_1024, True)):
            p = ScalePattern.from_sides(kind, sides)
            fwd, bwd = bs._fwd_candidates(D, long), bs._bwd_candidates(D, long)
            for i in range(max(len(fwd), len(bwd))):
                fc, bc = fwd[i % len(fwd)], bwd[i % len(bwd)]
                bs.FORCE_FWD_CONFIG, bs.FORCE_BWD_CONFIG = fc, bc
                try:
                    r = errors_vs_reference(bs.block_sparse_attention, p, 2, 2, D, torch.float16, None,
                                            "cuda")
                except OutOfResources:
                    continue
                assert max(r[t] for t in ("out", "dq", "dk", "dv")) < TOL["fp16"], (D, fc, bc, r)
    finally:
        bs.FORCE_FWD_CONFIG = bs.FORCE_BWD_CONFIG = None


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sides", [SIDES_512, SIDES_1024])
@pytest.mark.parametrize("aligned,bh_fast", [(True, False), (False, False), (True, True)])
def test_tiling_variants_gpu(sides, aligned, bh_fast, kind):
    """Aligned and uniform tiles, both grid orders, on the long schedules (scales up to 4096)."""
    import maskar.kernels.block_sparse as bs

    p = ScalePattern.from_sides(kind, sides)
    bs.FORCE_FWD_CONFIG = bs.FwdConfig(64, 32, 4, 3, aligned=aligned, bh_fast=bh_fast)
    bs.FORCE_BWD_CONFIG = bs.BwdConfig(32, 64, 64, 32, 4, 3, aligned=aligned, bh_fast=bh_fast)
    try:
        r = errors_vs_reference(bs.block_sparse_attention, p, 1, 3, 64, torch.float16, None, "cuda")
    finally:
        bs.FORCE_FWD_CONFIG = bs.FORCE_BWD_CONFIG = None
    assert r["finite"]
    for t in ("out", "dq", "dk", "dv"):
        assert r[t] < TOL["fp16"], (t, r)


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["flex", "varlen", "triton", "auto"])
@pytest.mark.parametrize("kind", KINDS)
def test_backends_match_fp32_sdpa_gpu(backend, kind):
    if backend not in available_backends() + ["auto"]:
        pytest.skip(f"{backend} not available")
    if backend == "varlen" and kind != "block_diagonal":
        pytest.skip("varlen expresses block_diagonal only")
    p = ScalePattern.from_sides(kind, SIDES_256)

    def fn(q, k, v, pattern, scale):
        return attention(q, k, v, pattern, backend=backend, scale=scale)

    r = errors_vs_reference(fn, p, 2, 4, 64, torch.bfloat16, 1.0, "cuda")
    assert r["finite"]
    for t in ("out", "dq", "dk", "dv"):
        assert r[t] < TOL["bf16"], (t, r)


@gpu
@needs_cuda
def test_auto_picks_triton_on_cuda():
    from maskar.kernels.block_sparse import supports

    p = ScalePattern.from_sides("block_causal", SIDES_256)
    q = torch.randn(1, 2, p.total, 64, device="cuda", dtype=torch.float16)
    assert supports(q, q, q, p)
    # at 256 px (680 tokens) the `scales` backend, first in priority, is for long-sequence
    # training only: auto passes it by, with and without autograd
    assert auto_backend_name(q, q, q, p) == "triton"
    with torch.no_grad():
        assert auto_backend_name(q, q, q, p) == "triton"
    assert torch.equal(attention(q, q, q, p), attention(q, q, q, p, backend="triton"))


def test_host_cdiv_and_next_power_of_2_equal_tritons():
    """The launch paths' plain-Python cdiv / next_power_of_2 (triton's are constexpr functions
    with microseconds of call overhead) give triton's values."""
    triton = pytest.importorskip("triton")
    from maskar.kernels.block_sparse import cdiv, next_power_of_2

    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in range(1, 70))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
