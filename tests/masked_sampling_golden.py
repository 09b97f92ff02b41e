"""Seeded fp32 CPU samples of tiny MAR / CASMAR models, recorded from a reference revision.

tests/test_masked_loop.py checks that today's samplers reproduce them (same seeds, the same
tokens bit for bit). The file uses only APIs the reference revision has, so it can be run against that
revision's checkout to re-record:

    cd /path/to/reference/checkout && OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1 \\
        PYTHONPATH=$PWD:/path/to/this/tests python /path/to/this/tests/masked_sampling_golden.py \\
        /path/to/this/tests/data/masked_sampling_golden.json

Recorded from main at 9439c91 (2026-12-03: official sampling semantics and traces in, the CUDA-
graph chain, the shared masked-generation loop and the DiT-head graphs of issue 15 not yet).
"""

from __future__ import annotations

import base64
import json
import sys

import torch
from helpers_masked import TINY_FIELDS, StandInKL

# (name, arch, model overrides, labels, generate / edit knobs)
CASES = [
    ("mar_cfg", "mar", {}, [0, 3, 10], dict(seed=0, num_iter=4, cfg=3.0, temperature=0.9)),
    ("mar_nocfg", "mar", {}, [1, 2], dict(seed=1, num_iter=7, cfg=1.0, num_sampling_steps="ddim5")),
    ("mar_constant", "mar", {}, [4, 5], dict(seed=2, num_iter=3, cfg=2.0, cfg_schedule="constant")),
    ("mar_edit", "mar", {}, [6, 7], dict(seed=3, num_iter=4, cfg=2.5, edit=True)),
    ("casmar_psa", "casmar", {}, [0, 3, 10],
     dict(seed=0, num_iter=3, scaffold_num_iter=3, cfg=3.0, re_cfg=2.0)),
    ("casmar_nocfg", "casmar", {}, [1, 2], dict(seed=1, num_iter=2, scaffold_num_iter=5, temperature=0.8)),
    ("casmar_sala", "casmar", {"head_attention": "sala"}, [4, 10],
     dict(seed=2, num_iter=4, scaffold_num_iter=2, cfg=2.0, re_cfg=1.5, cfg_schedule="constant")),
    ("casmar_edit", "casmar", {}, [6, 7], dict(seed=3, num_iter=3, scaffold_num_iter=3, cfg=2.5, re_cfg=2.0,
                                             edit=True)),
]  # fmt: skip


def build_model(arch: str, overrides: dict):
    """A tiny model with non-trivial weights everywhere (the official init zeroes the heads' outputs)."""
    from maskar.models.casmar import CASMAR, CASMARConfig
    from maskar.models.mar import MAR, MARConfig

    torch.manual_seed(0)
    if arch == "mar":
        model = MAR(MARConfig(**TINY_FIELDS, **overrides), tokenizer=StandInKL())
    else:
        fields = dict(
            cond_scale=2, gdm_d=1, gdm_w=16, gdm_heads=2, psa_kernel=3, refine_num_sampling_steps="4"
        )
        model = CASMAR(CASMARConfig(**TINY_FIELDS, **fields, **overrides), tokenizer=StandInKL())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def run_case(model, labels: list[int], knobs: dict) -> torch.Tensor:
    """The tokens of a seeded sampling call (``generate``'s, without the decode), or of ``edit``
    on a fixed image with a centre box kept; CASMAR: [big | scaffold] tokens (B, N + S, C)."""
    from maskar.nn.sampling import make_generator

    knobs = dict(knobs)
    lab = torch.tensor(labels)
    with torch.no_grad():
        if knobs.pop("edit", False):
            g = torch.Generator().manual_seed(9)
            images = torch.rand(len(labels), 3, 32, 32, generator=g) * 2 - 1
            keep = torch.zeros(len(labels), 1, 32, 32, dtype=torch.bool)
            keep[:, :, 8:24, 8:24] = True
            return model.edit(images, keep, lab, return_tokens=True, **knobs)
        out = model.sample_tokens(lab, generator=make_generator(knobs.pop("seed"), "cpu"), **knobs)
        return torch.cat(out, 1) if isinstance(out, tuple) else out


def record() -> dict:
    out = {}
    for name, arch, overrides, labels, knobs in CASES:
        tokens = run_case(build_model(arch, overrides), labels, knobs)
        raw = tokens.float().contiguous().numpy().tobytes()
        out[name] = {"shape": list(tokens.shape), "tokens_f32_base64": base64.b64encode(raw).decode()}
    return out


def decoded(entry: dict) -> torch.Tensor:
    """The recorded tokens of one case as a float32 tensor."""
    import numpy as np

    raw = np.frombuffer(base64.b64decode(entry["tokens_f32_base64"]), dtype=np.float32)
    return torch.from_numpy(raw.copy()).view(entry["shape"])


if __name__ == "__main__":
    torch.set_num_threads(1)
    with open(sys.argv[1], "w") as f:
        json.dump(record(), f)
