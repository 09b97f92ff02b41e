#!/usr/bin/env python3
"""Why the 2026-12-03 MAR / CASMAR exports of the quality study sampled garbage (docs/quality.md).

    python scripts/quality_diagnose.py CKPT_DIR STEPS [--per-class 20] [--skip-eval]

CKPT_DIR: an exported checkpoint of scripts/gpu/quality_mar_casmar.sh (EMA weights, tokenizer
inside); STEPS: the optimizer steps of its run. On the CPU it

1. rebuilds the run's initialisation (the trainer seeds ``train.seed`` before building the model on
   the CPU, so it is reproducible) and checks it is the one inside the EMA (correlation per tensor,
   against another seed as a control);
2. writes the bias-corrected EMA, (ema - d^T w0) / (1 - d^T) with d = train.ema, T = STEPS: the
   weighted average of the trained weights that the EMA was meant to be, without the init's share;
3. the held-out diffusion loss (test images, eval mode, 4 seeds) of both: the EMA's share of the
   random initialisation is what separates them;
4. the scaffold / MAR MLP head's eps error at a few timesteps (teacher-forced on test latents) and
   the gain from eps error to x_{t-1} at the first reverse step of each respacing: the even
   IDDPM spacing starts at t = 999 (cosine alpha_bar 2.4e-9), "ddimN" below it;
5. classifier metrics of ``--per-class`` samples per class for {EMA, bias-corrected} x {the export's
   own spacing, ddimN of the same count}.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from maskar import checkpoint as ck
from maskar.config import DataConfig
from maskar.data import build_dataset
from maskar.nn.diffusion import create_diffusion
from maskar.registry import build_model
from maskar.train.distributed import seed_everything

ROOT = Path(__file__).resolve().parent.parent
CLF = ROOT / "checkpoints" / "fmnist-classifier"


def init_weights(cfg, seed: int) -> dict[str, torch.Tensor]:
    seed_everything(seed)
    return {k: v.detach().float().clone() for k, v in build_model(cfg.model).state_dict().items()}


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1].item()


def bias_corrected(src: Path, dst: Path, steps: int) -> float:
    cfg = ck.read_config(src)
    w0 = init_weights(cfg, cfg.train.seed)
    other = init_weights(cfg, cfg.train.seed + 1)
    ema = ck.load_tensors(src / ck.MODEL_FILE)
    share = cfg.train.ema**steps
    # Frozen tokenizer weights are not averaged; untrained buffers come out unchanged (w0 = ema).
    trained = [k for k in ema if not k.startswith("tokenizer.") and ema[k].is_floating_point()]
    varied = [k for k in trained if w0[k].numel() > 1 and w0[k].std() > 0]  # for the correlations
    same = statistics.median(corr(w0[k], ema[k]) for k in varied)
    ctrl = statistics.median(corr(other[k], ema[k]) for k in varied)
    moved = statistics.median(((ema[k].float() - w0[k]).norm() / w0[k].norm()).item() for k in varied)
    print(f"  init of seed {cfg.train.seed} vs the EMA: median correlation {same:.4f} over {len(varied)} "
          f"tensors (another seed: {ctrl:.4f}); median |ema - init| / |init| {moved:.3f}")  # fmt: skip
    print(f"  the init's share of the EMA: {cfg.train.ema}^{steps} = {share:.4f}")
    out = {
        k: (v.float() - share * w0[k]) / (1 - share) if k in trained else v.float() for k, v in ema.items()
    }
    model = build_model(cfg.model)
    model.load_state_dict(out)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / ck.CONFIG_FILE, dst / ck.CONFIG_FILE)
    ck.save_model(dst, model, cfg)
    return share


@torch.no_grad()
def held_out(models: dict[str, torch.nn.Module]) -> None:
    ds = build_dataset(DataConfig(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist",
                                  split="test", channels=1, resolution=32))  # fmt: skip
    idx = list(range(0, 10000, 40))
    imgs = torch.stack([ds[i]["image"] for i in idx])
    labels = torch.tensor([int(ds[i]["label"]) for i in idx])
    for name, m in models.items():
        losses = []
        for s in range(4):
            torch.manual_seed(s)
            losses.append(m.loss({"image": imgs, "label": labels})["loss"].item())
        mean = statistics.mean(losses)
        print(f"  {name}: held-out training loss {mean:.4f} (250 test images, eval mode, 4 seeds)")
        if not hasattr(m, "cond_diffloss"):  # MAR: its one MLP head
            eps_error(m, m.diffloss, m.tokenizer.encode_mean(imgs), labels)


@torch.no_grad()
def eps_error(m, head, z: torch.Tensor, labels: torch.Tensor) -> None:
    """eps MSE of the MLP head at a few t, conditioned on decoder outputs of 70%-masked test latents."""
    from maskar.models.mar import mask_from_order

    tokens = m.patchify(z)
    b, n, c = tokens.shape
    g = torch.Generator().manual_seed(0)
    orders = torch.argsort(torch.rand(b, n, generator=g), dim=1)
    nm = int(n * 0.7)
    x, keep = m.forward_encoder(tokens, mask_from_order(orders, nm), m.class_embedding(labels), nm)
    zz = m.forward_decoder(x, keep)
    idx = orders[:, :nm, None]
    cond = torch.gather(zz, 1, idx.expand(-1, -1, zz.shape[-1])).reshape(-1, zz.shape[-1])
    tgt = torch.gather(tokens, 1, idx.expand(-1, -1, c)).reshape(-1, c)
    parts = []
    for t in (0, 100, 500, 900, 999):
        tt = torch.full((tgt.shape[0],), t)
        noise = torch.randn(tgt.shape, generator=g)
        out = head.net(head.train_diffusion.q_sample(tgt, tt, noise), tt, cond)
        parts.append(f"t={t}: {((out[:, :c] - noise) ** 2).mean().item():.4f}")
    print("    eps MSE of the MLP head: " + ", ".join(parts))


def gains() -> None:
    print("  first reverse step: x_{t-1} error per unit of eps error (c1 * sqrt(1/alpha_bar - 1))")
    for r in ("25", "100", "250", "ddim25", "ddim100", "ddim250"):
        d = create_diffusion(r)
        i = d.num_timesteps - 1
        gain = d.posterior_mean_coef1[i] * d.sqrt_recipm1_alphas_cumprod[i]
        t, abar = d.timestep_map[i], d.alphas_cumprod[i]
        print(f"    {r:8s} starts at t={t:4d} (alpha_bar {abar:.1e}): gain {gain:8.2f}")


def ddim(value: str) -> str:
    return value if value.startswith("ddim") else f"ddim{value}"


def evaluate(ckpts: dict[str, Path], per_class: int) -> None:
    from maskar import sampling
    from maskar.eval.classifier import ClassifierExtractor
    from maskar.eval.images import images_from_array
    from maskar.eval.run import evaluate as score

    clf = ClassifierExtractor(CLF, "cpu")
    for name, path in ckpts.items():
        cfg = ck.read_config(path)
        keys = ["num_sampling_steps"] + (
            ["refine_num_sampling_steps"] if hasattr(cfg.sample, "re_cfg") else []
        )
        own = [f"sample.{k}={getattr(cfg.sample, k)}" for k in keys]
        spaced = [f"sample.{k}={ddim(str(getattr(cfg.sample, k)))}" for k in keys]
        for label, over in (("own spacing", own), ("ddim spacing", spaced)):
            model, c = sampling.load_for_sampling(str(path), over, "cpu")
            tok = []
            orig = model.tokenizer.decode

            def spy(zs, _orig=orig, _tok=tok):
                _tok.append(zs.abs().max().item())
                return _orig(zs)

            model.tokenizer.decode = spy
            images, labels = sampling.generate(model, c, list(range(10)), per_class, 100)
            res = score(images_from_array(images, name, labels), ["fd_clf", "acc", "pr_clf"],
                        classifier=clf, device="cpu", progress=False)  # fmt: skip
            r = {x.metric: x.value for x in res}
            print(
                f"  {name:16s} {label:12s} {' '.join(over):70s} max |latent| {max(tok):9.1f}  "
                f"FD_clf {r['FD_clf']:7.2f} accuracy {r['accuracy']:.3f} precision {r['prec_clf']:.3f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("steps", type=int)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="quality_diagnose_"))
    fixed = work / f"{args.ckpt.name}-bias-corrected"
    print(f"== {args.ckpt} ({args.steps} steps)")
    bias_corrected(args.ckpt, fixed, args.steps)
    held_out({"EMA (exported)": ck.load_model(args.ckpt)[0], "bias-corrected EMA": ck.load_model(fixed)[0]})
    gains()
    if not args.skip_eval:
        evaluate({"EMA (exported)": args.ckpt, "bias-corrected": fixed}, args.per_class)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
