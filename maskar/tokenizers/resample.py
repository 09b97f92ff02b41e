"""Bicubic up- and area down-sampling of feature maps as two small matrix products.

``F.interpolate(x, size, mode)`` for ``bicubic`` (align_corners False) and ``area`` is a
separable linear map: out = A_h @ x @ A_w^T with A_h (H_out, h_in) and A_w (W_out, w_in).
PyTorch's CUDA bicubic kernel runs one thread per *output pixel* and loops over batch x
channels inside it, so at the tokenizer's sizes (16x16 outputs, B*C of 1,024 to 12,288
planes) it occupies a handful of SMs and its time grows with the batch: 7.5 ms of an
84.6 ms HMAR-d16 training step (docs/benchmarks.md). The same map as two GEMMs is a few
microseconds.

The matrices are *made by* ``F.interpolate`` itself: the identity basis (n_in maps of n_in x 1,
one-hot) interpolated in float64 to n_out x 1 gives column i of A = the image of basis vector
i, so border clamping, the A = -0.75 cubic kernel and the area windows are PyTorch's by
construction (a width-1 -> width-1 resize is the identity in both modes). They are cached per
(sizes, mode, device).

The products run in float64 and are cast back to the input's dtype: TF32 (``allow_tf32``,
``float32_matmul_precision``) and autocast never touch float64 matmuls, so the result is
fp32-exact whatever those settings are (within fp32 rounding of ``F.interpolate``, which
itself rounds its 16 products in fp32; tests/test_resample.py). The maps are tiny, so the
float64 GEMMs cost microseconds even at fp64 rates.

``backend`` picks the implementation: ``auto`` (default) uses the matrix form for bicubic on
CUDA and ``F.interpolate`` everywhere else, so CPU fp32 results stay bit-identical to the
official code's and to the recorded sampling goldens; area stays ``F.interpolate`` under
``auto`` (its CUDA kernel parallelises over planes and did not show in the profile);
``matmul`` forces the matrix form for both modes on every device, ``interpolate`` the
reference everywhere (``use_backend`` sets it for a block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

MODES = ("bicubic", "area")
BACKENDS = ("auto", "matmul", "interpolate")

backend = "auto"

_MATRICES: dict[tuple[int, int, str, torch.device], torch.Tensor] = {}


def resize_matrix(n_in: int, n_out: int, mode: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n_out, n_in) float64 matrix of ``F.interpolate``'s 1-D ``mode`` resize from n_in to n_out."""
    if mode not in MODES:
        raise ValueError(f"resample mode: expected one of {list(MODES)}, got {mode!r}")
    device = torch.device(device)
    key = (n_in, n_out, mode, device)
    mat = _MATRICES.get(key)
    if mat is None:
        basis = torch.eye(n_in, dtype=torch.float64).view(1, n_in, n_in, 1)  # channel i = e_i
        cols = F.interpolate(basis, size=(n_out, 1), mode=mode)  # (1, n_in, n_out, 1)
        mat = cols[0, :, :, 0].t().contiguous().to(device)
        _MATRICES[key] = mat
    return mat


def resize_matmul(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``F.interpolate(x, size, mode)`` of (..., h, w) as A_h @ x @ A_w^T in float64."""
    (h, w), (H, W) = x.shape[-2:], size
    a_h = resize_matrix(h, H, mode, x.device)
    a_w = a_h if (w, W) == (h, H) else resize_matrix(w, W, mode, x.device)
    y = torch.matmul(x.double(), a_w.t())  # (..., h, W): one GEMM over all rows
    return torch.matmul(a_h, y).to(x.dtype)  # (..., H, W)


def resize_reference(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """The reference: ``F.interpolate`` (align_corners False for bicubic)."""
    return F.interpolate(x, size=size, mode=mode)


def uses_matmul(mode: str, device: torch.device) -> bool:
    """Whether ``resize`` takes the matrix form for this mode on this device now."""
    if backend == "auto":
        return mode == "bicubic" and device.type == "cuda"
    return backend == "matmul"


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size) resized by ``mode``, by the implementation ``backend`` picks."""
    if uses_matmul(mode, x.device):
        return resize_matmul(x, size, mode)
    return resize_reference(x, size, mode)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Set ``backend`` to ``name`` inside the block (the benchmark and tests compare them)."""
    global backend
    if name not in BACKENDS:
        raise ValueError(f"resample backend: expected one of {list(BACKENDS)}, got {name!r}")
    old, backend = backend, name
    try:
        yield
    finally:
        backend = old
