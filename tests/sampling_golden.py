"""Seeded fp32 CPU samples of tiny VAR / HMAR models, recorded from a reference revision.

tests/test_sampling_speed.py checks that today's sampler reproduces them (same seeds, same
tokens, same images). The file uses only APIs the reference revision has, so it can be run
against that revision's checkout to re-record:

    cd /path/to/reference/checkout && OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1 \\
        PYTHONPATH=$PWD:/path/to/this/tests \\
        python /path/to/this/tests/sampling_golden.py /path/to/this/tests/data/sampling_golden.json

Recorded from main at 1eee427 (2026-12-03; HMAR's refinement already ranks by the official
filtered confidence), before the sampling speed work (issue 14); main at 9439c91 (traces,
given tokens, addcmul blocks) records the same file byte for byte.
"""

from __future__ import annotations

import base64
import json
import sys

import torch

TOKENIZER = dict(
    arch="vqvae", resolution=16, ch=16, ch_mult=[1, 2, 2], norm_groups=8, z_channels=8, vocab_size=96,
    patch_nums=[1, 2, 3, 4], enc_res_blocks=1, dec_res_blocks=1, mid_attn=True,
    enc_attn_levels=[-1], dec_attn_levels=[-1],
)  # fmt: skip

# (name, arch, model overrides, labels, sampling knobs)
CASES = [
    ("var_k8_p09", "var", {}, [0, 3, 10], dict(cfg=1.5, top_k=8, top_p=0.9, seed=0)),
    ("var_nofilter", "var", {}, [1, 2], dict(cfg=2.0, top_k=0, top_p=0.0, seed=1)),
    ("var_t07_k40_p05", "var", {}, [4, 10, 7], dict(cfg=1.0, temperature=0.7, top_k=40, top_p=0.5, seed=2)),
    ("var_constant_cfg", "var", {}, [5, 6],
     dict(cfg=3.0, cfg_schedule="constant", top_k=20, top_p=0.96, seed=3)),
    ("hmar1_k8_p09", "hmar", {"stage": 1}, [0, 3, 10], dict(cfg=1.5, top_k=8, top_p=0.9, seed=0)),
    ("hmar2_default", "hmar", {"stage": 2}, [0, 3, 10], dict(cfg=1.5, top_k=30, top_p=0.96, seed=4)),
    (
        "hmar2_schedule",
        "hmar",
        {"stage": 2},
        [2, 9],
        dict(cfg=2.0, top_k=12, top_p=0.8, seed=5, mask_schedule=[[1], [1, 3], [1, 1, 2, 5], [10, 6]]),
    ),
    (
        "hmar2_official_guidance",
        "hmar",
        {"stage": 2},
        [7, 8, 10],
        dict(cfg=1.7, top_k=0, top_p=0.9, seed=6, mask_schedule=[[1], [1, 3], [4, 5], [4, 8, 4]],
             refine_cfg_schedule="official"),
    ),  # fmt: skip
    (
        "hmar2_refine_cfg_unfiltered",
        "hmar",
        {"stage": 2},
        [1, 4],
        dict(cfg=1.5, top_k=16, top_p=0.0, seed=7, mask_schedule=[[1], [1, 3], [1, 1, 2, 5], [6, 10]],
             refine_cfg=1.0, confidence="unfiltered"),
    ),  # fmt: skip
]


def build_model(arch: str, overrides: dict):
    """A tiny model with non-trivial weights everywhere (the official init leaves blocks ~identity)."""
    from maskar.config import build
    from maskar.models.hmar import HMAR, HMARConfig
    from maskar.models.var import VAR, VARConfig

    torch.manual_seed(0)
    common = dict(tokenizer=TOKENIZER, depth=3, width=32, heads=2, num_classes=10)
    if arch == "var":
        model = VAR(build(VARConfig, dict(arch="var", **common, **overrides)))
    else:
        model = HMAR(build(HMARConfig, dict(n_layers_train=2, **common, **overrides)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # tokenizer included: its decoder must matter too
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def run_case(model, labels: list[int], knobs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(final token ids of every scale, images) of ``model.generate`` with ``knobs`` (fp32, CPU)."""
    knobs = dict(knobs)
    seed = knobs.pop("seed")
    core = {k: knobs.pop(k) for k in ("cfg", "cfg_schedule", "temperature", "top_k", "top_p") if k in knobs}
    defaults = dict(cfg=1.5, cfg_schedule="linear", temperature=1.0, top_k=900, top_p=0.96)
    defaults.update(core)
    lab = torch.tensor(labels)
    with torch.no_grad():
        images = model.generate(lab, seed=seed, **defaults, **knobs)
        args = model._sampling_args(*(defaults[k] for k in ("cfg", "cfg_schedule", "temperature", "top_k",
                                                             "top_p")), seed, "cpu")  # fmt: skip
        tokens: list[torch.Tensor] = []
        refine_kw = model._refine_options(knobs, editing=False)
        again = model._autoregress(lab, args, out_indices=tokens, **refine_kw)
    assert torch.equal(again, images)
    return tokens, images


def record() -> dict:
    out = {}
    for name, arch, overrides, labels, knobs in CASES:
        model = build_model(arch, overrides)
        tokens, images = run_case(model, labels, knobs)
        raw = images.float().contiguous().numpy().tobytes()
        out[name] = {"tokens": [t.tolist() for t in tokens], "shape": list(images.shape),
                     "images_f32_base64": base64.b64encode(raw).decode()}  # fmt: skip
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    with open(sys.argv[1], "w") as f:
        json.dump(record(), f)


def decoded_images(entry: dict) -> torch.Tensor:
    """The recorded images of one case as a float32 tensor."""
    import numpy as np

    raw = np.frombuffer(base64.b64decode(entry["images_f32_base64"]), dtype=np.float32)
    return torch.from_numpy(raw.copy()).view(entry["shape"])
