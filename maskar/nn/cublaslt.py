"""Two cuBLASLt matmuls with GELU epilogues that torch does not expose, called through ctypes.

``torch._addmm_activation`` reaches cuBLASLt's GELU epilogue without its auxiliary output, so a
training step cannot use it: the backward needs the GELU's input. cuBLASLt has the pair a
transformer MLP needs (TransformerEngine's LayerNormMLP uses the same two):

- ``GELU_AUX_BIAS`` (:func:`linear_gelu_aux`): ``pre = x @ w.T + b`` rounded to the output dtype
  and stored as the auxiliary output, ``act = gelu_tanh(pre)`` (applied to the fp32 accumulator
  plus bias) stored as the result, in one kernel;
- ``DGELU_BGRAD`` (:func:`matmul_dgelu_bgrad`): ``d pre = (dy @ w) * gelu_tanh'(pre)`` and the
  column sums of ``d pre`` (the bias gradient of the layer that made ``pre``), in one kernel.

The library is the one torch already loaded (found in ``/proc/self/maps``, else by soname).
Row-major ``out (M, N) = a (M, K) @ b`` is cuBLAS's column-major ``out^T = b^T a^T``: a
``(N, K)`` weight is matrix A with ``transa = T``, an ``(K, N)`` one with ``transa = N``, and
the activation ``(M, K)`` is matrix B untransposed; the epilogue's vectors run along D's rows
(N). Each shape's plan (descriptors, the heuristic's first algorithm, a workspace) is made once;
the per-call pointers are set on the plan's descriptor before each launch, on the current stream,
so CUDA graphs capture the calls. CUDA only; callers check :func:`available`.
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
    """Descriptors and algorithm of one (epilogue, dtype, M, N, K, transa) matmul."""

    def __init__(self, device_index: int, epilogue: int, dtype: torch.dtype, m: int, n: int, k: int,
                 transa: int, ptrs: tuple[int, int, int, int, int, int]) -> None:
        lib, dt = _lib(), _DTYPES[dtype]
        self.handle, self.ws = _handle(device_index)
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F),
               "MatmulDescCreate")
        _set(self.desc, _DESC_TRANSA, ctypes.c_int32(transa))
        _set(self.desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
        _set(self.desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        _set(self.desc, _DESC_AUX_LD, ctypes.c_int64(n))
        self.a, self.b, self.d = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        # A: the weight as stored, (N, K) row-major = (K, N) column-major, or (K, N) = (N, K)
        a_rows, a_cols = (k, n) if transa == _OP_T else (n, k)
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.a), dt, a_rows, a_cols, a_rows),
               "LayoutCreate(A)")
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.b), dt, k, m, k), "LayoutCreate(B)")
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.d), dt, n, m, n), "LayoutCreate(D)")
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
        wsb = ctypes.c_uint64(_WORKSPACE_BYTES)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE, ctypes.byref(wsb),
                                                        ctypes.sizeof(wsb)), "PreferenceSetAttribute")
        self._pointers(*ptrs[4:])  # the heuristic reads the pointers' alignment
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
        _set(self.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias))
        _set(self.desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux))

    def run(self, a: int, b: int, d: int, bias: int, aux: int) -> None:
        self._pointers(bias, aux)
        stream = torch.cuda.current_stream().cuda_stream
        _check(_lib().cublasLtMatmul(self.handle, self.desc, ctypes.byref(self.alpha), a, self.a, b, self.b,
                                     ctypes.byref(self.beta), d, self.d, d, self.d, ctypes.byref(self.algo),
                                     self.ws.data_ptr(), _WORKSPACE_BYTES, stream), "Matmul")


_plans: dict[tuple, _Plan] = {}


def _run(epilogue: int, transa: int, w: Tensor, x: Tensor, out: Tensor, bias: Tensor, aux: Tensor) -> None:
    m, k = x.shape
    n = out.shape[1]
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    key = (dev, epilogue, x.dtype, m, n, k, transa, ALGO_INDEX.get(epilogue, 0))
    ptrs = (w.data_ptr(), x.data_ptr(), out.data_ptr(), out.data_ptr(), bias.data_ptr(), aux.data_ptr())
    plan = _plans.get(key)
    if plan is None:
        with torch.cuda.device(dev):
            plan = _plans[key] = _Plan(dev, epilogue, x.dtype, m, n, k, transa, ptrs)
    plan.run(ptrs[0], ptrs[1], ptrs[2], ptrs[4], ptrs[5])


def fits(*ts: Tensor) -> bool:
    """Whether the operands suit the plans: one fp16 / bf16 dtype, contiguous, 256-byte aligned
    (the heuristic's default assumption for A, B, C, D), every dimension a multiple of 8."""
    return all(t.dtype in _DTYPES and t.dtype == ts[0].dtype and t.is_contiguous()
               and t.data_ptr() % 256 == 0 and all(s % 8 == 0 for s in t.shape[1:]) for t in ts)


def _check_operands(name: str, *ts: Tensor) -> None:
    if not fits(*ts):
        raise ValueError(f"{name}: operands {[(tuple(t.shape), t.dtype, t.stride()) for t in ts]} need one "
                         "fp16 / bf16 dtype, contiguous 256-byte aligned storage and widths divisible by 8")


def linear_gelu_aux(x: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(gelu_tanh(x @ w.T + b), x @ w.T + b) for x (M, K), w (N, K), b (N,): one cuBLASLt call."""
    _check_operands("linear_gelu_aux", x, w, b)
    act = x.new_empty((x.shape[0], w.shape[0]))
    pre = torch.empty_like(act)
    _run(GELU_AUX_BIAS, _OP_T, w, x, act, b, pre)
    return act, pre


def matmul_dgelu_bgrad(dy: Tensor, w: Tensor, pre: Tensor,
                       bgrad: bool = True) -> tuple[Tensor, Tensor | None]:
    """((dy @ w) * gelu_tanh'(pre), its column sums where ``bgrad`` else None) for dy (M, K),
    w (K, N), pre (M, N)."""
    _check_operands("matmul_dgelu_bgrad", dy, w, pre)
    dpre = torch.empty_like(pre)
    dbias = pre.new_empty(pre.shape[1]) if bgrad else pre
    _run(DGELU_BGRAD if bgrad else DGELU, _OP_N, w, dy, dpre, dbias, pre)
    return dpre, dbias if bgrad else None


def algo_count(epilogue: int) -> int:
    """How many algorithms the heuristic offered for the last plan made with ``epilogue``."""
    return max((p.count for k, p in _plans.items() if k[1] == epilogue), default=0)


def plans_made() -> int:
    """How many shapes have a plan (tests: the cache is reused)."""
    return len(_plans)
