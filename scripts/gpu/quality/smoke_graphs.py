"""Pre-flight for quality_mar_casmar.sh: MAR and CASMAR (the -s presets, random weights) sample on CUDA
through their default (graph) paths, twice (capture, then replay), with finite, repeatable output."""
import sys

import torch

from maskar.config import load_config
from maskar.registry import build_model

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
for preset in ("mar-fmnist-s", "casmar-fmnist-s"):
    m = build_model(load_config(preset, []).model).to(dev).eval()
    lab = torch.arange(4, device=dev)
    kw = dict(num_iter=2, num_sampling_steps="5", cfg=2.0)
    if preset.startswith("casmar"):
        kw.update(scaffold_num_iter=2, refine_num_sampling_steps="5", re_cfg=2.0)
    outs = []
    for _ in range(3):
        with torch.no_grad(), torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
            outs.append(m.generate(lab, seed=0, **kw).float())
    d = max((outs[0] - o).abs().max().item() for o in outs[1:])
    print(f"{preset}: finite {all(o.isfinite().all().item() for o in outs)}, repeat max abs diff {d:.2e}")
    assert all(o.isfinite().all() for o in outs) and d < 1e-3
print("smoke ok")
