"""Fused 2D neighbourhood attention kernel (maskar.kernels.neighborhood), forward and backward.

Every check compares out, dq, dk, dv with two float64 references on fresh random inputs
given as (B, H, L, D) views of (B, L, H, D) tensors (the DiT's projection layout): the
official unfold formulation (zero-padded border, CASMAR) or a per-query loop over NATTEN's
window starts (clamped border), and the SDPA + bias path of ``proximal_attention``.
Fresh outputs are poisoned with NaN before each run, so a row no program writes fails.

On CPU the Triton kernels run under TRITON_INTERPRET=1 in ONE subprocess (the variable
must be set before triton is imported); the parametrised tests read its results. GPU tests
(marked ``gpu``) run the same checks at real sizes, with the autotuner's candidates.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers_aot import compile_psa, compiles_as_launched, require_aot_compiler, resource_usage
from helpers_interpreter import run_under_interpreter
from test_proximal_attention import unfold_psa

from maskar.nn.proximal_attention import proximal_attention

TOL = {"fp32": 1e-5, "fp16": 3e-3, "bf16": 2.5e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (name, grid, kernel, dilation, border, B, H, D, dtype, interpreter tile (th, tw, block_n[, "whole"
# [, "fd"]]) or None; a set tile without "whole", or with "fd", recomputes delta in the programs)
INTERPRET_CASES = [
    ("casmar_k7", (8, 8), 7, 1, "zeros", 1, 2, 64, "fp32", None),
    ("rect_dil2", (9, 6), 3, 2, "zeros", 2, 1, 32, "fp32", (4, 8, 32)),
    ("window_larger_than_grid_k13", (5, 4), 13, 1, "zeros", 1, 2, 32, "fp16", None),
    ("k1", (4, 5), 1, 1, "zeros", 1, 1, 32, "fp32", None),
    ("per_axis_k_and_dilation", (7, 9), (5, 3), (1, 2), "zeros", 1, 2, 64, "bf16", None),
    ("d128", (6, 6), 5, 1, "zeros", 1, 1, 128, "bf16", (4, 4, 32)),
    ("multi_chunk_k13", (20, 18), 13, 1, "zeros", 1, 1, 32, "fp16", (8, 8, 64)),
    ("clamp_k3", (6, 7), 3, 1, "clamp", 2, 1, 32, "fp32", None),
    ("clamp_rect_dil2", (11, 9), (5, 3), 2, "clamp", 1, 2, 32, "fp16", (8, 4, 16)),
    ("clamp_window_larger_than_grid", (4, 6), 13, 1, "clamp", 1, 1, 64, "fp32", None),
    ("clamp_k13_dil2_shifted", (28, 8), (13, 3), (2, 1), "clamp", 1, 1, 32, "fp32", (8, 4, 32)),
    ("clamp_bf16_d128", (7, 5), 3, 1, "clamp", 1, 1, 128, "bf16", None),
    # one 16 x 16 tile over a whole 16 x 16 grid (the forward's whole-grid candidates), four chunks
    ("whole_grid_tile_k7", (16, 16), 7, 1, "zeros", 1, 1, 32, "fp32", (16, 16, 64)),
    # the whole-sub-grid backward (one program walks every key tile of its sub-grid, dQ summed
    # in its fp32 scratch): several tiles whose query rectangles overlap, both borders, dilation
    ("whole_k7_four_tiles", (8, 8), 7, 1, "zeros", 2, 2, 32, "fp32", (4, 4, 16, "whole")),
    ("whole_clamp_dil2", (9, 7), 5, 2, "clamp", 1, 2, 32, "fp16", (4, 4, 16, "whole")),
    ("whole_per_axis_bf16", (6, 10), (3, 5), (1, 2), "zeros", 1, 1, 64, "bf16", (4, 8, 32, "whole")),
    ("whole_fused_delta", (7, 9), 5, 1, "zeros", 2, 1, 32, "fp32", (4, 4, 16, "whole", "fd")),
    # the split backward (the dQ launch writes delta, then the dK / dV launch reads it): several
    # tiles, both borders, dilation, a partial last tile
    ("split_k7_four_tiles", (8, 8), 7, 1, "zeros", 2, 2, 32, "fp32", (4, 4, 16, "split")),
    ("split_clamp_dil2_bf16", (11, 9), (5, 3), 2, "clamp", 1, 2, 32, "bf16", (4, 4, 16, "split")),
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def natten_start(i: int, n: int, k: int, d: int) -> int:
    """NATTEN's window start (get_window_start) for k * d <= n; its formula, written out."""
    r = k // 2
    if d <= 1:
        return max(i - r, 0) + (i + r >= n) * (n - i - r - 1)
    if i - r * d < 0:
        return i % d
    if i + r * d >= n:
        a = (n // d) * d
        b = n - a
        return n - b + i % d - 2 * r * d if i % d < b else a + i % d - k * d
    return i - r * d


def axis_keys(i: int, n: int, k: int, d: int, border: str) -> list[int]:
    """Positions along one axis that position i attends to."""
    if border == "zeros":
        r = k // 2
        return [i + d * a for a in range(-r, r + 1) if 0 <= i + d * a < n]
    members = len(range(i % d, n, d))
    if k > members:  # window larger than the axis: its whole dilation class
        return list(range(i % d, n, d))
    s = natten_start(i, n, k, d)
    return list(range(s, s + k * d, d))


def loop_reference(q, k, v, grid, kernel, dilation, border, scale=None):
    """Per-query loop: softmax over the window's keys, plus (kh * kw - n) exp(0) terms for zeros."""
    b, nh, n, d = q.shape
    h, w = grid
    (kh, kw), (dh, dw) = _pair(kernel), _pair(dilation)
    scale = d**-0.5 if scale is None else scale
    rows = []
    for i in range(h):
        for j in range(w):
            ys, xs = axis_keys(i, h, kh, dh, border), axis_keys(j, w, kw, dw, border)
            keys = [y * w + x for y in ys for x in xs]
            logits = torch.einsum("bhd,bhkd->bhk", q[:, :, i * w + j], k[:, :, keys]) * scale
            extra = kh * kw - len(keys) if border == "zeros" else 0
            m = logits.amax(-1, keepdim=True).clamp(min=0) if extra else logits.amax(-1, keepdim=True)
            e = (logits - m).exp()
            denom = e.sum(-1, keepdim=True) + extra * (-m).exp()
            rows.append(torch.einsum("bhk,bhkd->bhd", e / denom, v[:, :, keys]))
    return torch.stack(rows, dim=2)


def reference(q, k, v, grid, kernel, dilation, border, scale=None):
    if border == "zeros" and scale is None:
        return unfold_psa(q, k, v, grid, kernel, dilation)
    return loop_reference(q, k, v, grid, kernel, dilation, border, scale)


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    """||a - b|| / max(||b||, floor): relative error; ``floor`` for references that may vanish
    (with k 1 a query sees only itself, so dq = dk = 0 exactly)."""
    return float((a.detach().double() - b.detach()).norm() / max(float(b.detach().norm()), floor))


def errors_vs_references(fn, grid, kernel, dilation, border, B, H, D, dtype, device, scale=None) -> dict:
    """Relative errors of out / dq / dk / dv of ``fn`` against the float64 references, the
    same for the SDPA + bias path run in ``dtype`` (a yardstick), and layout facts."""
    L = grid[0] * grid[1]
    leaves = [torch.randn(B, L, H, D, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in leaves)  # (B, H, L, D) views
    out = fn(q, k, v, grid, kernel, dilation, scale, border)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    res = {"finite": bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads),
           "out_blhd": out.transpose(1, 2).is_contiguous()}
    ref_in = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    small = L <= 400  # the per-query loop is slow: bigger cases use the unfold / SDPA references
    refs = {"sdpa64": proximal_attention(*ref_in, grid, kernel, dilation, scale, border, backend="sdpa")}
    if small or (border == "zeros" and scale is None):
        refs["ref"] = reference(*ref_in, grid, kernel, dilation, border, scale)
    sdpa_in = [x.detach().requires_grad_(True) for x in (q, k, v)]
    lowp = proximal_attention(*sdpa_in, grid, kernel, dilation, scale, border, backend="sdpa")
    lowp_grads = torch.autograd.grad(lowp, sdpa_in, dout)
    floor = 0.1 * float(dout.double().norm())  # gradients are O(|dO|) unless they vanish
    for rname, r in refs.items():
        rg = torch.autograd.grad(r, ref_in, dout.double(), retain_graph=True)
        for t, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (r, *rg)):
            res[f"{t}_{rname}"] = _rel(got, want, floor if t != "out" else 1e-300)
        if rname == "sdpa64":  # the yardstick: SDPA + bias in the same dtype vs float64
            for t, got, want in zip(("out", "dq", "dk", "dv"), (lowp, *lowp_grads), (r, *rg)):
                res[f"{t}_sdpa_same_dtype"] = _rel(got, want, floor if t != "out" else 1e-300)
    return res


def _kernel_fn(q, k, v, grid, kernel, dilation, scale, border):
    from maskar.kernels.neighborhood import neighborhood_attention

    return neighborhood_attention(q, k, v, grid, kernel, dilation, scale, border)


def assert_close_to_references(r: dict, dname: str) -> None:
    assert r["finite"] and r["out_blhd"], r
    for t in ("out", "dq", "dk", "dv"):
        for rname in ("ref", "sdpa64"):
            if f"{t}_{rname}" in r:
                assert r[f"{t}_{rname}"] < TOL[dname], (t, rname, r)
        # no worse than the SDPA + bias path in the same precision (it keeps P in fp32:
        # the kernel rounds P to the input dtype for the PV / dS products, as FlashAttention)
        assert r[f"{t}_sdpa64"] <= 4 * r[f"{t}_sdpa_same_dtype"] + TOL[dname] / 10, (t, r)


# ----------------------------------------------------------------------------- interpreter

_RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
import test_neighborhood_kernel as T
import maskar.kernels.neighborhood as nb
from maskar.nn.proximal_attention import proximal_attention, ProximalSelfAttention
nb.POISON_OUTPUTS = True
torch.manual_seed(0)
for name, grid, kernel, dil, border, B, H, D, dname, tile in T.INTERPRET_CASES:
    cfg = nb._INTERPRET_CONFIG if tile is None else nb.NaConfig(*tile[:3], 4, 1)
    nb.FORCE_FWD_CONFIG = cfg
    # delta = rowsum(O * dO) recomputed in the backward programs on the other cases with a set tile
    whole = tile is not None and "whole" in tile
    split = tile is not None and "split" in tile
    fd = tile is not None and not split and (not whole or "fd" in tile)
    nb.FORCE_BWD_CONFIG = nb.NaConfig(cfg.th, cfg.tw, cfg.block_n, 4, 1, fused_delta=fd, whole=whole,
                                      split=split)
    r = T.errors_vs_references(T._kernel_fn, grid, kernel, dil, border, B, H, D, T.DTYPES[dname], "cpu")
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
nb.FORCE_FWD_CONFIG = nb.FORCE_BWD_CONFIG = None
# auto reaches the kernel for fp16 / bf16 (interpreter on) and keeps fp32 on SDPA
q = torch.randn(1, 2, 30, 32, dtype=torch.bfloat16)
ker = nb.neighborhood_attention(q, q, q, (5, 6), 3, 1)
auto = proximal_attention(q, q, q, (5, 6), 3, 1)
q32 = q.float()
auto32 = proximal_attention(q32, q32, q32, (5, 6), 3, 1)
sdpa32 = proximal_attention(q32, q32, q32, (5, 6), 3, 1, backend="sdpa")
# the CASMAR DiT block (PSA, the model file's own class) runs the kernel in training (bf16)
from maskar.models.casmar import DiTBlock
calls = []
orig = nb._NeighborhoodAttention.forward
def counting(ctx, *a):
    calls.append(1)
    return orig(ctx, *a)
nb._NeighborhoodAttention.forward = staticmethod(counting)
blk = DiTBlock(64, 2, 2.0, "psa", 5, 1).to(torch.bfloat16)
torch.nn.init.normal_(blk.adaLN_modulation[1].weight, std=0.02)  # adaLN-Zero init would hide the attention
x = torch.randn(2, 36, 64, dtype=torch.bfloat16, requires_grad=True)
c = torch.randn(2, 36, 64, dtype=torch.bfloat16)
y = blk(x, c, (6, 6), c)
y.float().square().sum().backward()
blk.attn.na.attn_backend = "sdpa"
y_ref = blk(x, c, (6, 6), c)
print("RESULT " + json.dumps({{"case": "api", "auto_is_kernel": bool(torch.equal(auto, ker)),
      "fp32_auto_is_sdpa": bool(torch.equal(auto32, sdpa32)), "block_kernel_calls": len(calls),
      "block_rel": float((y.float() - y_ref.float()).norm() / y_ref.float().norm()),
      "block_grad_finite": bool(torch.isfinite(x.grad).all())}}), flush=True)
# inference under torch.compile: the opaque forward op, one graph, the eager kernel's output
blk.attn.na.attn_backend = "auto"
torch._dynamo.reset()
with torch.no_grad():
    eager = blk(x, c, (6, 6), c)
    explain = torch._dynamo.explain(blk)(x, c, (6, 6), c)
    compiled = torch.compile(blk, backend="aot_eager", fullgraph=True)(x, c, (6, 6), c)
print("RESULT " + json.dumps({{"case": "compiled", "graph_breaks": explain.graph_break_count,
      "graphs": explain.graph_count, "equal": bool(torch.equal(compiled, eager))}}), flush=True)
"""


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    pytest.importorskip("triton")
    return run_under_interpreter(_RUNNER, timeout=600)


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=[c[0] for c in INTERPRET_CASES])
def test_kernel_matches_float64_references_interpreted(interpreter_results, case):
    assert_close_to_references(interpreter_results[case[0]], case[8])


def test_auto_dispatch_and_casmar_block_use_the_kernel_interpreted(interpreter_results):
    r = interpreter_results["api"]
    assert r["auto_is_kernel"] and r["fp32_auto_is_sdpa"]
    assert r["block_kernel_calls"] == 1 and r["block_grad_finite"]
    assert r["block_rel"] < 2e-2  # bf16 block output, kernel vs SDPA + bias


def test_compiled_inference_is_one_graph_with_the_kernels_output_interpreted(interpreter_results):
    """Under torch.compile (no grad) PSA calls the opaque forward op: no graph break, and the
    compiled DiT block (fullgraph, aot_eager: fake impl and functionalization) equals eager."""
    r = interpreter_results["compiled"]
    assert r["graph_breaks"] == 0 and r["graphs"] == 1
    assert r["equal"]


# ----------------------------------------------------------------------------- host side


def test_references_agree_with_each_other():
    """The loop (NATTEN starts / zero-padded slots) and the unfold and SDPA + bias forms."""
    g = torch.Generator().manual_seed(0)
    for grid, kernel, dil in [((7, 6), 5, 1), ((9, 8), (3, 5), (2, 1)), ((4, 3), 7, 1)]:
        n = grid[0] * grid[1]
        q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
        want = unfold_psa(q, k, v, grid, kernel, dil)
        torch.testing.assert_close(loop_reference(q, k, v, grid, kernel, dil, "zeros"), want)
        clamp = loop_reference(q, k, v, grid, kernel, dil, "clamp")
        torch.testing.assert_close(proximal_attention(q, k, v, grid, kernel, dil, border="clamp"), clamp)
    # clamp windows stay k long inside the grid: a corner query of a 9-wide axis, k 5
    assert axis_keys(0, 9, 5, 1, "clamp") == [0, 1, 2, 3, 4] and axis_keys(0, 9, 5, 1, "zeros") == [0, 1, 2]
    assert axis_keys(8, 9, 3, 2, "clamp") == [4, 6, 8]


def test_supports_and_errors():
    pytest.importorskip("triton")
    import maskar.kernels.neighborhood as nb

    q = torch.randn(1, 2, 12, 64, dtype=torch.float16)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert nb.supports(q, q, q, (3, 4), 3, 1) is interpret  # CPU: only under the interpreter
    assert not nb.supports(q.float(), q.float(), q.float(), (3, 4), 3, 1)  # fp32 stays on SDPA
    assert not nb.supports(q[..., :48], q[..., :48], q[..., :48], (3, 4), 3, 1)  # head dim 48
    with pytest.raises(ValueError, match="do not fill grid"):
        nb.neighborhood_attention(q, q, q, (3, 5), 3, 1)
    with pytest.raises(ValueError, match="odd window"):
        nb.neighborhood_attention(q, q, q, (3, 4), 4, 1)
    with pytest.raises(ValueError, match="border"):
        nb.neighborhood_attention(q, q, q, (3, 4), 3, 1, border="wrap")
    if not interpret:
        with pytest.raises(ValueError, match="CUDA"):
            nb.neighborhood_attention(q, q, q, (3, 4), 3, 1)
        # auto on the CPU: the SDPA + bias path, bit for bit
        want = proximal_attention(q.float(), q.float(), q.float(), (3, 4), 3, 1, backend="sdpa")
        assert torch.equal(proximal_attention(q.float(), q.float(), q.float(), (3, 4), 3, 1), want)
    with pytest.raises(ValueError, match="backend"):
        proximal_attention(q, q, q, (3, 4), 3, 1, backend="cudnn")
    with pytest.raises(ValueError, match="border"):
        proximal_attention(q, q, q, (3, 4), 3, 1, border="reflect")


def test_tiles_cover_every_position_once():
    """The kernels' tile decomposition (pid -> residues, first sub-grid row / column),
    replayed in Python: every grid position is in exactly one tile, for any dilation."""
    pytest.importorskip("triton")
    import maskar.kernels.neighborhood as nb

    for grid, dil, (th, tw) in [((16, 16), (1, 1), (8, 8)), ((13, 7), (2, 3), (4, 8)),
                                ((5, 3), (4, 1), (8, 8))]:
        geom = nb.Window(grid, (3, 3), dil)
        (gh, gw, _, _, dh, dw, tiles_r, tiles_c), n_tiles = nb._geometry(geom, th, tw)
        seen = []
        for pid in range(n_tiles):
            row_t, col_t = divmod(pid, dw * tiles_c)
            rr, rc = row_t // tiles_r, col_t // tiles_c
            i0, j0 = (row_t % tiles_r) * th, (col_t % tiles_c) * tw
            nr, nc = len(range(rr, gh, dh)), len(range(rc, gw, dw))
            seen += [(rr + dh * i) * gw + rc + dw * j for i in range(i0, min(i0 + th, nr))
                     for j in range(j0, min(j0 + tw, nc))]
        assert sorted(seen) == list(range(gh * gw)), (grid, dil)


def test_tuning_picks_fastest_candidate_once_per_key(monkeypatch):
    """The host path without a GPU: launches recorded, candidate timings faked (each faster
    than the one before, so the last wins); the choice is cached per key; no tuning while a
    CUDA graph is being captured (the first candidate then)."""
    pytest.importorskip("triton")
    import maskar.kernels.neighborhood as nb

    launches = []
    timings = iter(range(1000, 0, -1))

    def fake_time(launch, rounds=5, per_round=8):
        launch()
        return float(next(timings))

    monkeypatch.setattr(nb, "_launch", lambda kernel, *args, **kw: launches.append(kernel))
    monkeypatch.setattr(nb, "_time_ms", fake_time)
    monkeypatch.setattr(nb, "_INTERPRET", False)
    monkeypatch.setattr(nb, "_tuned", {})
    monkeypatch.setattr(nb, "_tune_log", {})
    monkeypatch.setattr(nb, "TUNE_WHOLE", True)  # every candidate offered on this 8 x 8 grid
    leaves = [torch.randn(2, 64, 3, 64, dtype=torch.float16, requires_grad=True) for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in leaves)
    geom = nb.Window((8, 8), (7, 7), (1, 1))
    counts = []
    for _ in range(2):
        before = len(launches)
        out = nb._NeighborhoodAttention.apply(q, k, v, geom, 0.125)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        counts.append(len(launches) - before)
    fwd, bwd = nb._fwd_candidates(64), nb._bwd_candidates(64)
    assert {key[0]: c for key, c in nb.tuned_configs().items()} == {"fwd": fwd[-1], "bwd": bwd[-1]}
    def n_bwd(c):  # the delta launch unless fused, then the dK/dV + dQ launch
        return 1 + (not c.fused_delta)

    assert counts == [len(fwd) + 1 + sum(n_bwd(c) for c in bwd) + n_bwd(bwd[-1]), 1 + n_bwd(bwd[-1])]
    last_bwd = nb._na_bwd_whole if bwd[-1].whole else nb._na_bwd
    assert launches[-1] is last_bwd and launches[-1 - n_bwd(bwd[-1])] is nb._na_fwd
    log = nb.tuning_log()
    assert all(v["seconds"] >= 0 and len(v["candidates"]) in (len(fwd), len(bwd)) for v in log.values())
    monkeypatch.setattr(nb, "_tuned", {})
    monkeypatch.setattr(nb, "_capturing", lambda q: True)
    assert nb._config("fwd", q, geom, None) == fwd[0] and nb._tuned == {}


def test_whole_subgrid_backward_offered_only_for_few_tiles(monkeypatch):
    """The tuner times the whole-sub-grid backward only where a sub-grid has at most
    WHOLE_MAX_TILES tiles (CASMAR's 16 x 16 grid: 4 of 8 x 8; dilation 2: 1 per residue)."""
    pytest.importorskip("triton")
    import maskar.kernels.neighborhood as nb

    whole = next(c for c in nb._bwd_candidates(64) if c.whole)
    assert (whole.th, whole.tw) == (8, 8) and not nb._bwd_candidates(64)[0].whole
    # not timed by default until a GPU run has checked it (MASKAR_PSA_WHOLE=1 asks for it)
    assert not nb._offered(whole, nb.Window((16, 16), (7, 7), (1, 1))) or nb.TUNE_WHOLE
    monkeypatch.setattr(nb, "TUNE_WHOLE", True)
    offered = {(g, d): nb._offered(whole, nb.Window(g, (7, 7), d)) for g, d in
               [((16, 16), (1, 1)), ((16, 16), (2, 2)), ((32, 32), (1, 1)), ((17, 16), (1, 1))]}
    assert offered == {((16, 16), (1, 1)): True, ((16, 16), (2, 2)): True,
                       ((32, 32), (1, 1)): False, ((17, 16), (1, 1)): False}
    big = nb.Window((64, 64), (7, 7), (1, 1))
    assert all(nb._offered(c, big) for c in nb._bwd_candidates(64) if not c.whole)


# ----------------------------------------------------------------------------- AOT compile


@pytest.mark.parametrize(
    "phase,arch,dtype,head_dim,clamp,which",
    [("fwd", 90, "bf16", 64, False, 0), ("bwd", 90, "bf16", 64, False, 0), ("fwd", 90, "fp16", 128, True, 0),
     ("bwd", 90, "bf16", 128, False, 0), ("bwd", 90, "fp16", 32, True, 1), ("fwd", 90, "bf16", 64, False, 5),
     ("bwd", 90, "bf16", 64, False, 2), ("fwd", 80, "bf16", 64, False, 0), ("bwd", 80, "fp16", 64, True, 3),
     ("bwd", 90, "bf16", 64, False, 7), ("bwd", 90, "fp16", 128, True, 5), ("bwd", 80, "bf16", 64, False, 8),
     ("bwd", 90, "bf16", 64, True, 9)],
)
def test_kernels_compile_to_cubin_without_a_gpu(phase, arch, dtype, head_dim, clamp, which):
    """The interpreter does not compile: this catches what only the real compiler rejects
    (Hopper and Ampere, both dtypes, both borders, head dims 32 / 64 / 128, several of the
    autotuner's candidates); the dots must become tensor-core instructions, wgmma on sm90
    for 64-row tiles."""
    require_aot_compiler()
    import maskar.kernels.neighborhood as nb

    cands = nb._fwd_candidates(head_dim) if phase == "fwd" else nb._bwd_candidates(head_dim)
    try:
        compiled = compile_psa(phase, cands[which], head_dim, dtype, clamp, arch)
    except FileNotFoundError as e:  # no ptxas in this Triton build
        pytest.skip(f"no CUDA toolchain in this Triton: {e}")
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    ptx = compiled.asm["ptx"]
    if arch == 90 and cands[which].th * cands[which].tw >= 64:
        assert "wgmma.mma_async" in ptx
    else:
        assert "mma.sync" in ptx or "wgmma.mma_async" in ptx


def test_the_low_register_candidates_compile_without_spills_as_launched():
    """The candidates added on 2026-12-04 night (forward 32-key chunks with 4 stages and 16-key
    chunks; backward without pipelining and with 16-key chunks, whole-sub-grid included) and on
    2026-12-05 (unpipelined forwards; unpipelined backwards with the delta fused, 16- and 64-key
    chunks; the forward's whole-grid 16 x 16 tiles) are the tuner's low-register forms: compiled
    for sm90 as CASMAR-B's launch specialises them, none spills. (Compiled from bare signatures,
    without the launch's alignment facts, most backward configs seemed to spill: docs/kernels.md,
    *Register spills*.)"""
    require_aot_compiler()
    import maskar.kernels.neighborhood as nb
    from maskar.kernels.block_sparse import _blhd_empty, _grads_empty

    B, H, L, D = 1, 16, 256, 64
    geom = nb.Window((16, 16), (7, 7), (1, 1), "zeros")
    q, k, v = (t.transpose(1, 2) for t in torch.randn(B, L, 3, H, D, dtype=torch.bfloat16).unbind(2))
    o, do, lse = _blhd_empty(B, H, L, D, q), _blhd_empty(B, H, L, D, q), torch.empty(B * H, L)
    added = [("fwd", c) for c in nb._fwd_candidates(D)[6:]] + [("bwd", c) for c in nb._bwd_candidates(D)[10:]]
    assert len(added) == 20
    for phase, cfg in added:
        try:
            with compiles_as_launched() as found:
                if phase == "fwd":
                    nb._launch_fwd(q, k, v, o, lse, 0.18, geom, cfg)
                else:
                    nb._launch_bwd(q, k, v, o, do, *_grads_empty(B, H, L, D, q), lse, torch.empty_like(lse),
                                   0.18, 0.125, geom, cfg)
        except FileNotFoundError as e:
            pytest.skip(f"no CUDA toolchain in this Triton: {e}")
        for name, compiled in found:
            usage = resource_usage(compiled)
            if usage is None:
                pytest.skip("no cuobjdump in this Triton")
            assert usage["STACK"] == 0, (phase, name, cfg, usage)


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (grid, kernel, dilation, border, B, H, D, dtype): real sizes. fp32 inputs (IEEE-fp32 dots,
# a test-only path whose sm90 compile takes long) are covered by the interpreter cases.
GPU_CASES = [
    ((16, 16), 7, 1, "zeros", 4, 4, 64, "bf16"),  # CASMAR-B's head
    ((16, 16), 7, 1, "zeros", 4, 4, 64, "fp16"),
    ((32, 32), 7, 1, "zeros", 2, 4, 64, "bf16"),
    ((64, 48), 13, 2, "zeros", 1, 2, 64, "bf16"),  # rectangular, k 13, dilation 2
    ((128, 128), 7, 1, "zeros", 1, 2, 64, "bf16"),
    ((8, 8), 13, 1, "zeros", 2, 4, 64, "bf16"),  # window larger than the grid
    ((24, 20), (7, 3), (1, 2), "zeros", 2, 2, 32, "fp16"),  # per-axis window and dilation, D 32
    ((16, 16), 5, 1, "zeros", 2, 2, 128, "bf16"),  # D 128
    ((16, 16), 1, 1, "zeros", 2, 2, 64, "bf16"),  # k 1
    ((32, 24), 7, 1, "clamp", 2, 2, 64, "bf16"),
    ((40, 40), 13, 2, "clamp", 1, 2, 64, "fp16"),
    ((6, 10), 13, 1, "clamp", 2, 2, 128, "bf16"),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-k{c[1]}-d{c[2]}-{c[3]}-D{c[6]}-{c[7]}")
def test_kernel_matches_references_gpu(case):
    import maskar.kernels.neighborhood as nb

    grid, kernel, dil, border, B, H, D, dname = case
    # pinned configs keep this test free of autotuning (every candidate: the test below)
    nb.FORCE_FWD_CONFIG, nb.FORCE_BWD_CONFIG = nb._fwd_candidates(D)[0], nb._bwd_candidates(D)[0]
    nb.POISON_OUTPUTS = True
    torch.manual_seed(0)
    try:
        r = errors_vs_references(_kernel_fn, grid, kernel, dil, border, B, H, D, DTYPES[dname], "cuda")
    finally:
        nb.FORCE_FWD_CONFIG = nb.FORCE_BWD_CONFIG = None
        nb.POISON_OUTPUTS = False
    assert_close_to_references(r, dname)


@gpu
@needs_cuda
@pytest.mark.parametrize("D,border", [(64, "zeros"), (128, "clamp")])
def test_every_candidate_config_is_correct_gpu(D, border):
    """Autotuning may pick any candidate: each must be right (one that cannot compile is skipped by it)."""
    from triton.runtime.errors import OutOfResources

    import maskar.kernels.neighborhood as nb

    fwd, bwd = nb._fwd_candidates(D), nb._bwd_candidates(D)
    nb.POISON_OUTPUTS = True
    try:
        for i in range(max(len(fwd), len(bwd))):
            nb.FORCE_FWD_CONFIG, nb.FORCE_BWD_CONFIG = fwd[i % len(fwd)], bwd[i % len(bwd)]
            torch.manual_seed(i)
            try:
                r = errors_vs_references(_kernel_fn, (20, 36), 7, 1, border, 2, 2, D, torch.bfloat16, "cuda")
            except OutOfResources:
                continue
            assert_close_to_references(r, "bf16")
    finally:
        nb.FORCE_FWD_CONFIG = nb.FORCE_BWD_CONFIG = None
        nb.POISON_OUTPUTS = False


@gpu
@needs_cuda
@pytest.mark.parametrize("grid,kernel,dil", [((16, 16), 7, 1), ((16, 24), 7, 1), ((16, 16), 13, 2)])
def test_whole_subgrid_backward_is_deterministic_gpu(grid, kernel, dil):
    """The whole-sub-grid backward sums dQ in its scratch across tile walks separated only by
    barriers: a missing or misplaced one shows as run-to-run differences. Twenty backward calls
    on one input must give bit-identical dq, dk, dv, close to the default backward's."""
    import maskar.kernels.neighborhood as nb

    torch.manual_seed(0)
    leaves = [torch.randn(4, grid[0] * grid[1], 8, 64, device="cuda", dtype=torch.bfloat16,
                          requires_grad=True) for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in leaves)
    dout = torch.randn(4, 8, grid[0] * grid[1], 64, device="cuda", dtype=torch.bfloat16)

    def grads(cfg):
        nb.FORCE_FWD_CONFIG, nb.FORCE_BWD_CONFIG = nb._fwd_candidates(64)[0], cfg
        try:
            out = nb.neighborhood_attention(q, k, v, grid, kernel, dil)
            return torch.autograd.grad(out, (q, k, v), dout)
        finally:
            nb.FORCE_FWD_CONFIG = nb.FORCE_BWD_CONFIG = None

    for cfg in [c for c in nb._bwd_candidates(64) if c.whole]:
        first = grads(cfg)
        for _ in range(19):
            again = grads(cfg)
            assert all(torch.equal(a, b) for a, b in zip(first, again)), cfg
        ref = grads(nb._bwd_candidates(64)[0])
        for got, want in zip(first, ref):
            assert _rel(got, want.double()) < 2e-2, cfg


@gpu
@needs_cuda
def test_auto_uses_kernel_on_cuda_and_in_a_cuda_graph():
    import maskar.kernels.neighborhood as nb

    q = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    assert nb.supports(q, q, q, (16, 16), 7, 1)
    ker = nb.neighborhood_attention(q, q, q, (16, 16), 7, 1)
    assert torch.equal(proximal_attention(q, q, q, (16, 16), 7, 1), ker)
    # sampling may capture the DiT head into a CUDA graph: the kernel replays (no tuning inside)
    static = q.clone()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        proximal_attention(static, static, static, (16, 16), 7, 1)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = proximal_attention(static, static, static, (16, 16), 7, 1)
    fresh = torch.randn_like(q)
    static.copy_(fresh)
    g.replay()
    torch.cuda.synchronize()
    want = proximal_attention(fresh.float(), fresh.float(), fresh.float(), (16, 16), 7, 1, backend="sdpa")
    assert _rel(out, want.double()) < TOL["bf16"]


@gpu
@needs_cuda
def test_casmar_dit_block_trains_through_the_kernel_gpu():
    """A CASMAR DiT block under bf16 autocast (how the trainer runs it) calls the kernel, and
    its output and input gradient match the SDPA + bias path."""
    import maskar.kernels.neighborhood as nb
    from maskar.models.casmar import DiTBlock

    torch.manual_seed(0)
    blk = DiTBlock(512, 8, 4.0, "psa", 7, 1).cuda()
    torch.nn.init.normal_(blk.adaLN_modulation[1].weight, std=0.02)
    x = torch.randn(8, 256, 512, device="cuda", requires_grad=True)
    c = torch.randn(8, 256, 512, device="cuda")
    calls = []
    orig = nb._NeighborhoodAttention.forward
    res = {}
    try:
        nb._NeighborhoodAttention.forward = staticmethod(lambda ctx, *a: calls.append(1) or orig(ctx, *a))
        for backend in ("auto", "sdpa"):
            blk.attn.na.attn_backend = backend
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = blk(x, c, (16, 16), c)
            (gx,) = torch.autograd.grad(y.float().square().mean(), x)
            res[backend] = (y.float(), gx)
    finally:
        nb._NeighborhoodAttention.forward = staticmethod(orig)
    assert len(calls) == 1
    assert _rel(res["auto"][0], res["sdpa"][0].double()) < 1e-2
    assert _rel(res["auto"][1], res["sdpa"][1].double()) < 3e-2


def test_floor_flops_formula_matches_a_pair_count():
    """The floor column counts in-window in-grid pairs exactly: the per-axis product form."""
    from maskar.bench.psa import Problem, window_pairs

    for grid, kernel, dil in [((16, 16), 7, 1), ((128, 128), 13, 2), ((9, 5), 5, 3)]:
        h, w = grid
        n = sum(len(axis_keys(i, h, kernel, dil, "zeros")) for i in range(h)) * sum(
            len(axis_keys(j, w, kernel, dil, "zeros")) for j in range(w))
        assert window_pairs(Problem(grid, kernel, dil)) == n
    assert window_pairs(Problem((16, 16), 7, 1)) == 100 * 100  # 16 * 7 - 2 * (3 + 2 + 1) per axis
