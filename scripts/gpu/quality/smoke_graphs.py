"""Pre-flight of the quality study's device calls (seconds): the study's models, with random weights,
sample through the study's own entry (maskar.sampling.generate) on the device, where the CUDA-only
paths run (VAR / HMAR per-scale graphs, the MAR / CASMAR diffusion-head graph chains): three batches
of one size (eager, capture, replay). A crash or a non-finite image stops the call before any
training is spent on it (on 2026-12-03 a graph call-site bug surfaced only after 5 minutes).

    python scripts/gpu/quality/smoke_graphs.py DEVICE MODEL... (var, hmar, mar, casmar)
"""

import sys
import time

import torch

from maskar import sampling
from maskar.config import load_config
from maskar.registry import build_model

PRESETS = {
    "var": "var-fmnist",
    "hmar": "hmar-fmnist-finetune",
    "mar": "mar-fmnist-s",
    "casmar": "casmar-fmnist-s",
}
FAST = {  # few steps: only the paths matter here
    "var": [],
    "hmar": [],
    "mar": ["sample.num_iter=4", "sample.num_sampling_steps=ddim10"],
    "casmar": ["sample.num_iter=2", "sample.scaffold_num_iter=4", "sample.num_sampling_steps=ddim10",
               "sample.refine_num_sampling_steps=ddim10"],
}  # fmt: skip


def graphs_off(model) -> None:
    if hasattr(model, "cuda_graphs"):
        model.cuda_graphs = False
    for m in model.modules():
        if hasattr(m, "cuda_graph"):
            m.cuda_graph = False


def main(dev: str, names: list[str]) -> None:
    for name in names:
        t0 = time.perf_counter()
        cfg = load_config(PRESETS[name], FAST[name])
        torch.manual_seed(0)
        model = build_model(cfg.model).to(dev).eval()
        # 3 batches of 10: the first eager, the second captured, the third replayed
        graph_imgs, labels = sampling.generate(model, cfg, list(range(10)), 3, 10)
        graphs_off(model)
        eager_imgs, _ = sampling.generate(model, cfg, list(range(10)), 3, 10)
        diff = (graph_imgs.float() - eager_imgs.float()).abs().mean().item()
        ok = graph_imgs.shape == eager_imgs.shape == (30, 32, 32, 3) and labels[-1] == 9
        print(f"{name}: {tuple(graph_imgs.shape)} uint8, graph vs eager mean |diff| {diff:.3f} levels "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
        if not ok:
            sys.exit(f"smoke: {name} produced {tuple(graph_imgs.shape)} images")
    print("smoke ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(PRESETS))
