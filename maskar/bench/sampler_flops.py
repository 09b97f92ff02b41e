"""FLOP model of MAR and CASMAR sampling: what one sampling call costs in matmul FLOPs.

Counted: every matrix product (linear layers, 1x1 convolutions, attention's two products,
the saliency affinity x x^T) at 2 FLOPs per multiply-add, on the rows each actually sees,
which is what ``torch.utils.flop_counter.FlopCounterMode`` counts (checked against it in
``tests/test_sampler_flops.py``). Elementwise work (norms, activations, the diffusion step
arithmetic, softmax) is not counted: it is memory traffic, not FLOPs. Images/s at a given
TFLOP/s follow as ``batch / (flops / tflops)``.

Per sampling call, with R the transformer rows (B, or 2B with CFG) and ``lin(m)`` = 2 x the
weights of the linear layers of module m:

- transformer pass (MAR): ``R [L lin(z_proj) + sum_enc T_e (lin(blk) + 4 T_e d_e)
  + T_e lin(decoder_embed) + sum_dec T_d (lin(blk) + 4 T_d d_d)]`` with T_e = buffer +
  visible tokens (the sparse encoder), T_d = buffer + L. CASMAR's pass is the same over
  [buffer | scaffold | big] plus its scaffold projections and the per-stack task adaLN (one
  row).
- MLP head call (MAR, CASMAR stage 1) on n rows, T steps: ``n lin(cond_embed) + T [lin(t-MLP)
  + n (lin(input_proj) + sum_blocks lin(blk) + lin(final))]``: every row runs every step.
- DiT head call (CASMAR stage 2) on n rows of an L-token grid, T steps: ``n L conv(c_emb)
  + T n [L conv(x_emb) + lin(t-MLP) + L (sum_blocks (lin(blk) + 4 K W) + lin(final))]``;
  the adaLN modulation is per token (6W x W per block), K = keys per query: k^2 for PSA (the
  window, padded slots included, as the official unfold computes), or what an
  implementation executes (the SDPA path: all L keys + the zero key, padded to 8).
- SAMS saliency: ``2 N L^2 D`` per call on the conditional decoder features.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from maskar.models.mar import cosine_mask_ratio

# ----------------------------------------------------------------------------- building blocks


def lin(module: nn.Module) -> int:
    """2 x weights of every nn.Linear in ``module`` (FLOPs per row through all of them)."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def conv1x1(conv: nn.Conv2d) -> int:
    """FLOPs per pixel of a 1x1 convolution."""
    kh, kw = conv.kernel_size
    return 2 * conv.in_channels * conv.out_channels * kh * kw // conv.groups


def vit_stack(blocks: Iterable[nn.Module], tokens: int, dim: int) -> int:
    """One sample through ViT blocks (MAR's Block, CASMAR's TaskBlock): linears + attention."""
    return sum(tokens * (lin(blk) + 4 * tokens * dim) for blk in blocks)


def saliency(rows: int, length: int, dim: int) -> int:
    """SAMS affinity x x^T on (rows, length, dim) features."""
    return 2 * rows * length * length * dim


def mlp_head(head: nn.Module, rows: int, steps: int) -> int:
    """One :meth:`DiffLoss.sample` call on ``rows`` rows (CFG halves included) over ``steps`` steps."""
    net = head.net
    per_row_step = lin(net.input_proj) + sum(lin(b) for b in net.res_blocks) + lin(net.final_layer)
    return rows * lin(net.cond_embed) + steps * (lin(net.time_embed.mlp) + rows * per_row_step)


def dit_attention_keys(head: nn.Module, executed: bool = False) -> int:
    """Keys per query of the DiT head's local attention: the k x k window, or (``executed``)
    what the SDPA + bias path computes (all L keys + the zero key, padded to 8)."""
    attn = head.net.blocks[0].attn
    local = attn.na if hasattr(attn, "na") else attn
    if executed:
        h, w = head.net.grid
        return -(-(h * w + 1) // 8) * 8
    kh, kw = local.kernel_size
    return kh * kw


def dit_head(head: nn.Module, rows: int, steps: int, keys: int | None = None) -> int:
    """One DiT-head sampling call on ``rows`` rows (CFG halves included) over ``steps`` steps.

    ``keys``: attention keys per query (default: the k x k window, see :func:`dit_attention_keys`).
    """
    net = head.net
    h, w = net.grid
    n_tok = h * w
    width = net.x_embedder.proj.out_channels
    keys = dit_attention_keys(head) if keys is None else keys
    per_token = lin(net.final_layer)
    per_sample = lin(net.t_embedder.mlp)
    for blk in net.blocks:
        attn = blk.attn
        if hasattr(attn, "na"):  # PSA
            per_token += lin(blk) + 4 * keys * width
        else:  # SALA: keys/values of the anchor branch act on the pooled anchors only
            anchors = n_tok // attn.anchor_pool**2
            anchor_kv = lin(attn.k_proj_anc) + lin(attn.v_proj_anc)
            per_token += lin(blk) - anchor_kv + 4 * (keys + anchors) * width
            per_sample += anchors * anchor_kv
    step = rows * (n_tok * (conv1x1(net.x_embedder.proj) + per_token) + per_sample)
    return rows * n_tok * conv1x1(net.c_embedder.proj) + steps * step


# ----------------------------------------------------------------------------- transformer passes


def mar_pass(model: nn.Module, rows: int, num_masked: int) -> int:
    """One MAR encoder + decoder pass with ``num_masked`` of the L tokens masked."""
    d_e, d_d = model.cfg.encoder_embed_dim, model.cfg.decoder_embed_dim
    t_e = model.buffer_size + model.seq_len - num_masked
    t_d = model.buffer_size + model.seq_len
    return rows * (
        model.seq_len * lin(model.z_proj)
        + vit_stack(model.encoder_blocks, t_e, d_e)
        + t_e * lin(model.decoder_embed)
        + vit_stack(model.decoder_blocks, t_d, d_d)
    )


def casmar_pass(model: nn.Module, rows: int, stage: int, num_masked: int, batch: int) -> int:
    """One CASMAR encoder + decoder pass of ``stage`` (0 scaffold, 1 refine) with
    ``num_masked`` of the [scaffold | big] tokens masked; ``batch`` rows embed the scaffold
    latents (stage 0: ``cond_proj`` runs before the CFG copy)."""
    d_e, d_d = model.cfg.encoder_embed_dim, model.cfg.decoder_embed_dim
    s, n = model.scaffold_len, model.seq_len
    t_e = model.buffer_size + s + n - num_masked
    t_d = model.buffer_size + s + n
    flops = rows * (
        n * lin(model.z_proj)
        + vit_stack(model.encoder_blocks, t_e, d_e)
        + t_e * lin(model.decoder_embed)
        + vit_stack(model.decoder_blocks, t_d, d_d)
    )
    flops += lin(model.encoder_blocks_ada) + lin(model.decoder_blocks_ada)  # task modulation, 1 row
    if stage == 0:
        flops += batch * s * lin(model.cond_proj)
    return flops


def casmar_refine_scaffold(model: nn.Module, batch: int) -> int:
    """Stage 2's Pred-Cond scaffold features (once per call): placeholder + cond_z_proj."""
    return model.scaffold_len * (lin(model.cond_proj) + batch * lin(model.cond_z_proj))


# ----------------------------------------------------------------------------- whole calls


def _total(parts: dict[str, int]) -> dict[str, int]:
    parts["total"] = sum(parts.values())
    return parts


def mar_sampling(
    model: nn.Module, batch: int, guided: bool, head_steps: int, reveals: Sequence[int]
) -> dict[str, int]:
    """FLOPs of one ``MAR.sample_tokens`` call from its trace (tokens revealed per step, per
    sample; every step listed ran the transformer). Keys: transformer, head, total."""
    rows = 2 * batch if guided else batch
    masked, transformer, head = sum(reveals), 0, 0
    for k in reveals:
        transformer += mar_pass(model, rows, masked)
        if k:
            head += mlp_head(model.diffloss, rows * k, head_steps)
        masked -= k
    return _total({"transformer": transformer, "head": head})


def casmar_sampling(
    model: nn.Module,
    batch: int,
    guided1: bool,
    guided2: bool,
    head_steps1: int,
    head_steps2: int,
    stage1: Sequence[tuple[int, int]],
    stage2: Sequence[int],
    scaffold_num_iter: int,
    num_iter: int,
    dit_keys: int | None = None,
) -> dict[str, int]:
    """FLOPs of one ``CASMAR.sample_tokens`` call.

    ``stage1``: per scaffold step (masked scaffold tokens per sample at the step's start,
    tokens drawn in the step summed over the batch); ``stage2``: masked big tokens per sample
    at the start of each refinement step. (The official fallback for a scaffold sample that
    would draw nothing reads the saliency SAMS computed for the same features: no FLOPs of its
    own.) Keys: stage1_transformer, stage1_head, stage2_transformer, dit_head, saliency, total.
    """
    rows1, rows2 = (2 * batch if guided1 else batch), (2 * batch if guided2 else batch)
    s, n, d = model.scaffold_len, model.seq_len, model.cfg.decoder_embed_dim
    parts = dict.fromkeys(
        ("stage1_transformer", "stage1_head", "stage2_transformer", "dit_head", "saliency"), 0
    )
    for step, (masked, drawn) in enumerate(stage1):
        parts["stage1_transformer"] += casmar_pass(model, rows1, 0, masked + n, batch)
        parts["stage1_head"] += mlp_head(model.diffloss, drawn * (2 if guided1 else 1), head_steps1)
        if step < scaffold_num_iter - 1:
            parts["saliency"] += saliency(batch, s, d)
    if stage2:
        parts["stage2_transformer"] += casmar_refine_scaffold(model, batch)
    for step, masked in enumerate(stage2):
        parts["stage2_transformer"] += casmar_pass(model, rows2, 1, masked, batch)
        parts["dit_head"] += dit_head(model.cond_diffloss, rows2, head_steps2, dit_keys)
        if step < num_iter - 1:
            parts["saliency"] += saliency(batch, n, d)
    return _total(parts)


def mar_counts(trace: Any) -> list[int]:
    """Tokens revealed per step and sample, from a ``SamplingTrace`` of ``MAR.sample_tokens``."""
    return [int(step.mask[0].sum()) for step in trace.select("mar")]


def casmar_counts(trace: Any) -> tuple[list[tuple[int, int]], list[int]]:
    """(stage1, stage2) of :func:`casmar_sampling` from a ``SamplingTrace`` of
    ``CASMAR.sample_tokens``: per scaffold step the masked tokens per sample and the tokens
    drawn over the batch, per refinement step the masked tokens per sample."""
    stage1 = []
    for step in trace.select("scaffold"):
        stage1.append((int(step.info["input_mask"][0].sum()), int(step.mask.sum())))
    stage2 = [int(step.mask[0].sum()) for step in trace.select("refine")]
    return stage1, stage2


def amr_masked(length: int, base: float) -> int:
    """Tokens SAMS/AMR leaves masked at base ratio ``base`` when the salient share is 1/2
    (AMR then keeps the base ratio): ``length - max(1, int(length (1 - base)))``."""
    return length - max(1, int(length * (1.0 - base)))


def casmar_nominal_counts(
    model: nn.Module, batch: int, scaffold_num_iter: int, num_iter: int
) -> tuple[list[tuple[int, int]], list[int]]:
    """The per-step counts of :func:`casmar_sampling` for a nominal run: AMR at its base
    ratio (half the tokens salient) and nested masks. Real runs move the masked counts by
    AMR's +-10% and re-draw re-masked scaffold tokens; the DiT head and the decoder, which
    see every token at every step, are exact either way."""

    def schedule(length: int, steps: int) -> list[tuple[int, int]]:
        out, masked = [], length
        for step in range(steps):
            if masked == 0:
                break
            nxt = 0 if step >= steps - 1 else amr_masked(length, cosine_mask_ratio(step, steps))
            out.append((masked, max(masked - nxt, 1)))
            masked = nxt
        return out

    stage1 = [(m, batch * k) for m, k in schedule(model.scaffold_len, scaffold_num_iter)]
    stage2 = [m for m, _ in schedule(model.seq_len, num_iter)]
    return stage1, stage2


# ----------------------------------------------------------------------------- command line


def build_parser():
    """The command line of :func:`main` (tests parse documented commands with it)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="maskar bench sampler_flops", description=main.__doc__.splitlines()[0], allow_abbrev=False
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="for the floor in images/s")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``maskar bench sampler_flops``: the FLOP model of the sampling settings the targets use
    (no GPU, no weights: the models are built on the meta device)."""
    import torch

    from maskar.config import load_config
    from maskar.registry import build_model

    ap = build_parser()
    args = ap.parse_args(argv)
    if args.batch < 1 or args.peak_tflops <= 0:
        ap.error("--batch: expected >= 1; --peak-tflops: expected > 0")
    b = args.batch
    print(f"FLOP model, batch {b} with CFG (PFLOP); floor at {args.peak_tflops:g} TFLOP/s")
    print("| sampler | parts | total | floor img/s |")
    print("|---|---|---|---|")
    cases = [("mar-b", {"num_iter": 64}), ("mar-b", {"num_iter": 256}), ("casmar-b", {"num_iter": 4})]
    cases.append(("casmar-h", {"num_iter": 12}))
    for preset, kw in cases:
        cfg = load_config(preset)
        with torch.device("meta"):
            model = build_model(cfg.model)
        t1 = model.diffloss.gen_diffusion(cfg.sample.num_sampling_steps).num_timesteps
        if cfg.model.arch == "mar":
            reveals = mar_schedule(model.seq_len, kw["num_iter"])
            parts = mar_sampling(model, b, True, t1, reveals)
        else:
            t2 = model.cond_diffloss.gen_diffusion(cfg.sample.refine_num_sampling_steps).num_timesteps
            steps1 = 4 * model.cfg.cond_scale
            stage1, stage2 = casmar_nominal_counts(model, b, steps1, kw["num_iter"])
            parts = casmar_sampling(model, b, True, True, t1, t2, stage1, stage2, steps1, kw["num_iter"])
        split = ", ".join(f"{k} {v / 1e15:.3f}" for k, v in parts.items() if k != "total")
        floor = b / (parts["total"] / (args.peak_tflops * 1e12))
        print(f"| {preset} num_iter {kw['num_iter']} | {split} | {parts['total'] / 1e15:.3f} | {floor:.1f} |")
    return 0


def mar_schedule(n: int, num_iter: int) -> list[int]:
    """Tokens MAR reveals per step (per sample): after step s, floor(n cos(pi/2 (s+1)/T)) stay
    masked, at least one until the last step (what ``MAR.sample_tokens`` traces)."""
    masked, out = n, []
    for step in range(num_iter):
        if masked == 0:
            break
        nxt = (
            0 if step >= num_iter - 1 else max(1, min(masked - 1, int(n * cosine_mask_ratio(step, num_iter))))
        )
        out.append(masked - nxt)
        masked = nxt
    return out
