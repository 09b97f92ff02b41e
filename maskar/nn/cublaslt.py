"""cuBLASLt matmuls with epilogues that torch does not expose, called through ctypes.

``torch._addmm_activation`` reaches cuBLASLt's GELU epilogue without its auxiliary output, so a
training step cannot use it: the backward needs the GELU's input. cuBLASLt has what a transformer
MLP's training needs (TransformerEngine's LayerNormMLP uses the same epilogues):

- ``GELU_AUX_BIAS`` (:func:`linear_gelu_aux`): ``pre = x @ w.T + b`` rounded to the output dtype
  and stored as the auxiliary output, ``act = gelu_tanh(pre)`` (applied to the fp32 accumulator
  plus bias) stored as the result, in one kernel;
- ``DGELU`` (:func:`matmul_dgelu_bgrad`): ``d pre = (dy @ w) * gelu_tanh'(pre)`` in one kernel;
  ``DGELU_BGRAD`` adds the column sums of ``d pre``, but ran at 0.91 ms against 0.26 without
  them on an H100 at HMAR-d16's 1024 px shape, every algorithm the heuristic offered (2026-12-07);
- ``BGRADB`` (:func:`weight_grad_bgrad`): a linear's weight gradient ``d out.T @ x`` and its bias
  gradient, the column sums of ``d out``, in one kernel; ``BGRADA`` (:func:`weight_grad_t_bgrad`)
  the same for the transposed weight gradient ``x.T @ d out``.

The library is the one torch already loaded (found in ``/proc/self/maps``, else by soname).
Row-major ``out (M, N) = op(L) @ op(R)`` is cuBLAS's column-major ``out^T = op(R)^T op(L)^T``:
R is matrix A, L matrix B (:class:`_Plan`). Each shape's plan (descriptors, the heuristic's first
algorithm, a workspace) is made once; the per-call pointers are set on the plan's descriptor
before each launch, on the current stream, so CUDA graphs capture the calls. CUDA only; callers
check :func:`available`.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

# cublasLt.h / cublas_api.h / library_types.h (CUDA 12 and 13 agree on these)
_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 68
_R_32F, _R_16F, _R_16BF = 0, 2, 14
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
_PREF_MAX_WORKSPACE = 1
GELU_AUX_BIAS = 32 | 128 | 4
DGELU = 64 | 128
DGELU_BGRAD = 64 | 128 | 16
BGRADA = 256
BGRADB = 512
ALGO_INDEX: dict[int, int] = {}  # epilogue -> which of the heuristic's answers (default its first)
_WORKSPACE_BYTES = 32 << 20
_DTYPES = {torch.float16: _R_16F, torch.bfloat16: _R_16BF}


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t),
                ("state", ctypes.c_int), ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    """torch's cuBLASLt, or None where there is none (CPU builds)."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libcublasLt.so" in line})
    except OSError:
        pass
    for name in paths + ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        vp, i64, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64
        lib.cublasLtCreate.argtypes = [ctypes.POINTER(vp)]
        lib.cublasLtMatmulDescCreate.argtypes = [ctypes.POINTER(vp), ctypes.c_int, ctypes.c_int]
        lib.cublasLtMatmulDescSetAttribute.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
        lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.POINTER(vp), ctypes.c_int, u64, u64, i64]
        lib.cublasLtMatmulPreferenceCreate.argtypes = [ctypes.POINTER(vp)]
        lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
        lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int,
                                                       ctypes.POINTER(_HeuristicResult),
                                                       ctypes.POINTER(ctypes.c_int)]
        lib.cublasLtMatmul.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp,
                                       ctypes.c_size_t, vp]
        return lib
    return None


LOADED = False  # the library found (load()); a plain flag that compiled code may read


def load() -> bool:
    """Find the library (layers call this when built, never inside a torch.compile trace)."""
    global LOADED
    LOADED = torch.version.cuda is not None and _lib() is not None
    return LOADED


def available(device: torch.device) -> bool:
    """Whether the epilogue matmuls can run on ``device`` (CUDA, :func:`load` found the library)."""
    return device.type == "cuda" and LOADED


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


def _set(desc: ctypes.c_void_p, attr: int, value: ctypes._SimpleCData) -> None:
    _check(_lib().cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(value), ctypes.sizeof(value)),
           f"MatmulDescSetAttribute({attr})")


@functools.cache
def _handle(device_index: int) -> tuple[ctypes.c_void_p, Tensor]:
    """The device's handle and workspace (made once, outside any graph capture's pool)."""
    h = ctypes.c_void_p()
    _check(_lib().cublasLtCreate(ctypes.byref(h)), "Create")
    ws = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=torch.device("cuda", device_index))
    return h, ws


class _Plan:
    """Descriptors and algorithm of one row-major ``out (M, N) = op(L) (M, K) @ op(R) (K, N)``:
    column-major ``out^T = op(R)^T op(L)^T``, so R is cuBLAS's A and L its B."""

    def __init__(self, device_index: int, epilogue: int, dtype: torch.dtype, m: int, n: int, k: int,
                 l_t: bool, r_t: bool, bias: int, aux: int) -> None:
        lib, dt = _lib(), _DTYPES[dtype]
        self.epilogue = epilogue
        self.handle, self.ws = _handle(device_index)
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F),
               "MatmulDescCreate")
        _set(self.desc, _DESC_TRANSA, ctypes.c_int32(_OP_T if r_t else _OP_N))
        _set(self.desc, _DESC_TRANSB, ctypes.c_int32(_OP_T if l_t else _OP_N))
        _set(self.desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        if epilogue & 128:
            _set(self.desc, _DESC_AUX_LD, ctypes.c_int64(n))
        self.a, self.b, self.d = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        # R stored (K, N) row-major is (N, K) column-major: A itself; stored (N, K) (r_t): A^T.
        # L stored (M, K) is (K, M) column-major: B itself; stored (K, M) (l_t): B^T.
        a_shape = (k, n) if r_t else (n, k)
        b_shape = (m, k) if l_t else (k, m)
        for layout, (rows, cols) in ((self.a, a_shape), (self.b, b_shape), (self.d, (n, m))):
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dt, rows, cols, rows), "LayoutCreate")
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
        wsb = ctypes.c_uint64(_WORKSPACE_BYTES)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE, ctypes.byref(wsb),
                                                        ctypes.sizeof(wsb)), "PreferenceSetAttribute")
        self._pointers(bias, aux)  # the heuristic reads the pointers' alignment
        results, count = (_HeuristicResult * 8)(), ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.d, self.d,
                                                  pref, 8, results, ctypes.byref(count)),
               "MatmulAlgoGetHeuristic")
        if count.value < 1:
            raise RuntimeError(f"cuBLASLt has no algorithm for epilogue {epilogue}, {dtype}, "
                               f"M {m} N {n} K {k}")
        self.count = count.value
        self.algo = results[min(ALGO_INDEX.get(epilogue, 0), count.value - 1)].algo
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def _pointers(self, bias: int, aux: int) -> None:
        # a pointer the epilogue does not take is an INVALID_VALUE at the call
        if self.epilogue & (4 | 16 | 256 | 512):
            _set(self.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias))
        if self.epilogue & 128:
            _set(self.desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux))

    def run(self, r: int, left: int, d: int, bias: int, aux: int) -> None:
        self._pointers(bias, aux)
        stream = torch.cuda.current_stream().cuda_stream
        _check(_lib().cublasLtMatmul(self.handle, self.desc, ctypes.byref(self.alpha), r, self.a, left,
                                     self.b, ctypes.byref(self.beta), d, self.d, d, self.d,
                                     ctypes.byref(self.algo), self.ws.data_ptr(), _WORKSPACE_BYTES, stream),
               "Matmul")


_plans: dict[tuple, _Plan] = {}


def _mm(epilogue: int, out: Tensor, left: Tensor, l_t: bool, right: Tensor, r_t: bool,
        bias: Tensor | None = None, aux: Tensor | None = None) -> None:
    """``out = op(left) @ op(right)`` row-major, ``op`` a transpose where ``l_t`` / ``r_t``, with
    ``epilogue``'s bias / aux pointers."""
    m, n = out.shape
    k = left.shape[0] if l_t else left.shape[1]
    dev = out.device.index if out.device.index is not None else torch.cuda.current_device()
    key = (dev, epilogue, out.dtype, m, n, k, l_t, r_t, ALGO_INDEX.get(epilogue, 0))
    bias_p = bias.data_ptr() if bias is not None else 0
    aux_p = aux.data_ptr() if aux is not None else 0
    plan = _plans.get(key)
    if plan is None:
        with torch.cuda.device(dev):
            plan = _plans[key] = _Plan(dev, epilogue, out.dtype, m, n, k, l_t, r_t, bias_p, aux_p)
    plan.run(right.data_ptr(), left.data_ptr(), out.data_ptr(), bias_p, aux_p)


# the plans' fp16 / bf16 epilogues: Ampere and later (measured and GPU-tested on sm90 only)
MIN_CAPABILITY = (8, 0)


@functools.cache
def arch_ok(index: int) -> bool:
    """Whether CUDA device ``index`` is new enough for the plans (call it outside a torch.compile
    trace: the custom ops' bodies do)."""
    return tuple(torch.cuda.get_device_capability(index)) >= MIN_CAPABILITY


def fits(*ts: Tensor) -> bool:
    """Whether the operands suit the plans: one fp16 / bf16 dtype, contiguous, 256-byte aligned
    (the heuristic's default assumption for A, B, C, D), every dimension a multiple of 8."""
    return all(t.dtype in _DTYPES and t.dtype == ts[0].dtype and t.is_contiguous()
               and t.data_ptr() % 256 == 0 and all(s % 8 == 0 for s in t.shape[1:]) for t in ts)


def usable(*ts: Tensor) -> bool:
    """Whether the plans can take these operands here: CUDA, sm80 or later, :func:`fits` (the ops'
    bodies ask, outside any torch.compile trace)."""
    return ts[0].is_cuda and arch_ok(ts[0].device.index) and fits(*ts)


def _check_operands(name: str, *ts: Tensor) -> None:
    if not fits(*ts):
        raise ValueError(f"{name}: operands {[(tuple(t.shape), t.dtype, t.stride()) for t in ts]} need one "
                         "fp16 / bf16 dtype, contiguous 256-byte aligned storage and widths divisible by 8")


def linear_gelu_aux(x: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(gelu_tanh(x @ w.T + b), x @ w.T + b) for x (M, K), w (N, K), b (N,): one cuBLASLt call."""
    _check_operands("linear_gelu_aux", x, w, b)
    act = x.new_empty((x.shape[0], w.shape[0]))
    pre = torch.empty_like(act)
    _mm(GELU_AUX_BIAS, act, x, False, w, True, b, pre)
    return act, pre


def matmul_dgelu_bgrad(dy: Tensor, w: Tensor, pre: Tensor,
                       bgrad: bool = True) -> tuple[Tensor, Tensor | None]:
    """((dy @ w) * gelu_tanh'(pre), its column sums where ``bgrad`` else None) for dy (M, K),
    w (K, N), pre (M, N)."""
    _check_operands("matmul_dgelu_bgrad", dy, w, pre)
    dpre = torch.empty_like(pre)
    dbias = pre.new_empty(pre.shape[1]) if bgrad else None
    _mm(DGELU_BGRAD if bgrad else DGELU, dpre, dy, False, w, False, dbias, pre)
    return dpre, dbias


def weight_grad_bgrad(dout: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(dout.T @ x, dout's column sums) for dout (M, N), x (M, K): a linear's weight and bias
    gradients in one call (``BGRADB``: the sum over the matmul's reduction dimension of its B)."""
    _check_operands("weight_grad_bgrad", dout, x)
    dw = dout.new_empty((dout.shape[1], x.shape[1]))
    db = dout.new_empty(dout.shape[1])
    _mm(BGRADB, dw, dout, True, x, False, db)
    return dw, db


def weight_grad_t_bgrad(dout: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(x.T @ dout, dout's column sums) for dout (M, N), x (M, K): the transposed weight gradient
    with the bias gradient as ``BGRADA`` (d out as cuBLAS's untransposed A, where
    :func:`weight_grad_bgrad` has it as a transposed B)."""
    _check_operands("weight_grad_t_bgrad", dout, x)
    dw_t = dout.new_empty((x.shape[1], dout.shape[1]))
    db = dout.new_empty(dout.shape[1])
    _mm(BGRADA, dw_t, x, True, dout, False, db)
    return dw_t, db


def algo_count(epilogue: int) -> int:
    """How many algorithms the heuristic offered for the last plan made with ``epilogue``."""
    return max((p.count for k, p in _plans.items() if k[1] == epilogue), default=0)


def plans_made() -> int:
    """How many shapes have a plan (tests: the cache is reused)."""
    return len(_plans)
