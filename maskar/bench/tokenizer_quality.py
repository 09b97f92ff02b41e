"""Reconstruction quality of a trained tokenizer on a held-out split.

    maskar bench tokenizer_quality CKPT_DIR [split=test] [limit=N] [batch_size=256]
                                   [device=auto] [json=out.json]

Reads the model and its data section from the checkpoint directory. Prints mean per-image
PSNR (images in [-1, 1], peak-to-peak 2), and
- for ``vqvae``: per-scale codebook usage (distinct codes hit over the split / vocab size)
  and perplexity (exp of the entropy of the code histogram);
- for ``klvae``: the statistics of the unscaled posterior mean and the scale factor
  1 / std that would give unit-variance latents.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

_KEYS = {"split", "limit", "batch_size", "device", "json"}


def _parse(argv: list[str]) -> tuple[str, dict[str, str]]:
    pos = [a for a in argv if "=" not in a]
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    bad = sorted(set(opts) - _KEYS)
    if len(pos) != 1 or bad:
        raise SystemExit(
            "usage: python -m maskar.bench.tokenizer_quality CKPT_DIR [split=test] [limit=N] "
            f"[batch_size=256] [device=auto] [json=PATH]; got {argv}"
        )
    return pos[0], opts


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device) -> dict:
    """PSNR and tokenizer statistics over every batch of ``loader``."""
    from maskar.tokenizers.losses import psnr

    arch = model.cfg.arch
    n_img, psnr_sum = 0, 0.0
    hist = None
    lat_sum = lat_sq = lat_n = 0.0
    for batch in loader:
        img = batch["image"].to(device)
        if arch == "vqvae":
            ids = model.img_to_indices(img)
            rec = model.indices_to_img(ids)
            counts = torch.stack([torch.bincount(i.flatten(), minlength=model.vocab_size) for i in ids])
            hist = counts if hist is None else hist + counts  # (S, V)
        else:
            mean = model.encode_moments(img).chunk(2, dim=1)[0].float()
            rec = model.decode_unscaled(mean).clamp(-1, 1)
            lat_sum += mean.sum().item()
            lat_sq += mean.pow(2).sum().item()
            lat_n += mean.numel()
        psnr_sum += psnr(rec.float(), img.float()).item() * img.shape[0]
        n_img += img.shape[0]
    out = {"arch": arch, "images": n_img, "psnr": psnr_sum / max(n_img, 1)}
    if arch == "vqvae":
        scales = []
        for k, pn in enumerate(model.patch_nums):
            h = hist[k].double()
            p = h / h.sum()
            ent = -(p[p > 0] * p[p > 0].log()).sum().item()
            scales.append(
                {"scale": k, "side": pn, "usage": (h > 0).double().mean().item(), "perplexity": math.exp(ent)}
            )
        out["scales"] = scales
        out["usage_all"] = (hist.sum(0) > 0).double().mean().item()
        out["vocab_size"] = model.vocab_size
    else:
        m = lat_sum / lat_n
        std = math.sqrt(max(lat_sq / lat_n - m * m, 0.0))
        out.update(latent_mean=m, latent_std=std, suggested_scale_factor=1.0 / std if std > 0 else None)
        out["scale_factor"] = model.scale_factor
    return out


def format_table(res: dict) -> str:
    lines = [f"{res['arch']}: {res['images']} images, PSNR {res['psnr']:.2f} dB"]
    if res["arch"] == "vqvae":
        lines.append(f"| scale | side | codebook usage (of {res['vocab_size']}) | perplexity |")
        lines.append("|---|---|---|---|")
        for s in res["scales"]:
            lines.append(f"| {s['scale']} | {s['side']} | {100 * s['usage']:.1f}% | {s['perplexity']:.1f} |")
        lines.append(f"| all | - | {100 * res['usage_all']:.1f}% | - |")
    else:
        lines.append(
            f"latent mean {res['latent_mean']:.4f}, std {res['latent_std']:.4f} (unscaled); "
            f"configured scale_factor {res['scale_factor']}, 1/std = {res['suggested_scale_factor']:.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from maskar.checkpoint import load_model
    from maskar.data import build_dataset

    ckpt, opts = _parse(sys.argv[1:] if argv is None else argv)
    device = _device(opts.get("device", "auto"))
    model, cfg = load_model(ckpt, device=device)
    if cfg.model.arch not in ("vqvae", "klvae"):
        raise SystemExit(f"{ckpt}: holds a {cfg.model.arch!r} model; expected a vqvae or klvae tokenizer")
    data = cfg.data
    data.split = opts.get("split", "test")
    data.hflip = False
    if "limit" in opts:
        data.limit = int(opts["limit"])
    ds = build_dataset(data)
    loader = torch.utils.data.DataLoader(ds, batch_size=int(opts.get("batch_size", 256)), shuffle=False)
    t0 = time.time()
    res = evaluate(model, loader, device)
    res.update(checkpoint=str(ckpt), split=data.split, seconds=round(time.time() - t0, 1))
    args = " ".join([ckpt] + [f"{k}={v}" for k, v in opts.items()])
    print(f"command: python -m maskar.bench.tokenizer_quality {args}")
    print(f"device: {device}, torch {torch.__version__}")
    print(format_table(res))
    if "json" in opts:
        with open(opts["json"], "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
