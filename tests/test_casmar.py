"""CASMAR: official layout (v1 PSA / v2 SALA), SAMS/AMR, both training stages, sampling, editing,
converter, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_masked import TINY_FIELDS, StandInKL, assert_strict_meta_load, official_file
from reference_tables import REFERENCE

from maskar.models.casmar import (
    CASMAR,
    CASMARConfig,
    GlobalDiffLoss,
    TaskBlock,
    saliency_mask,
    saliency_scores,
    sincos_2d,
)
from maskar.nn.sampling import SamplingTrace


def tiny_cfg(**kw) -> CASMARConfig:
    # 4x4 big tokens; cond_scale 2 -> 16 px scaffold image -> 2x2 scaffold tokens
    base = dict(
        TINY_FIELDS,
        cond_scale=2,
        gdm_d=1,
        gdm_w=16,
        gdm_heads=2,
        psa_kernel=3,
        refine_num_sampling_steps="4",
    )
    base.update(kw)
    return CASMARConfig(**base)


def tiny_casmar(**kw) -> CASMAR:
    torch.manual_seed(0)
    return CASMAR(tiny_cfg(**kw), tokenizer=StandInKL())


def randomize_heads(model: CASMAR) -> None:
    # Both heads start with a zero output layer (eps = 0); give them weights so CFG matters.
    g = torch.Generator().manual_seed(1)
    for p in [*model.diffloss.parameters(), *model.cond_diffloss.parameters()]:
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def casmar_b_dit(depth: int, device: str = "cuda"):
    """A LocalDiT at CASMAR-B's width (512, 8 heads, 16 x 16 grid, PSA 7 x 7), every trainable
    weight N(0, 0.02): adaLN-Zero would start each block at zero output."""
    from maskar.models.casmar import LocalDiT

    torch.manual_seed(0)
    net = LocalDiT(16, 768, (16, 16), depth, 512, 8, 4.0, "psa", 7, 1, 1000, 0.0).to(device).eval()
    for p in net.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return net


SAMPLE = dict(num_iter=2, scaffold_num_iter=2, num_sampling_steps="3", refine_num_sampling_steps="3")

# ----------------------------------------------------------------------------- official layout


@pytest.mark.parametrize(
    ("table", "attention", "trainable"),
    [
        ("casmar_base_state_dict_shapes.json", "psa", 244_468_016),
        ("casmar_sala_base_state_dict_shapes.json", "sala", 254_436_144),
    ],
)
def test_base_matches_official_state_dict_and_loads_strictly(table, attention, trainable):
    path = REFERENCE / table
    if not path.exists():
        pytest.skip("no reference tables")
    shapes = json.loads(path.read_text())
    with torch.device("meta"):
        model = CASMAR(CASMARConfig(head_attention=attention), tokenizer=StandInKL(16, 16))
    own = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("tokenizer.")}
    assert own == shapes and list(own) == list(shapes)  # same keys, shapes and order
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("tokenizer.")]
    assert sum(p.numel() for _, p in named if p.requires_grad) == trainable
    frozen = sorted(n for n, p in named if not p.requires_grad)
    assert frozen == ["cond_diffloss.net.c_pos_embed", "cond_diffloss.net.pos_embed"]
    assert_strict_meta_load(model, shapes)


@pytest.mark.parametrize(
    ("preset", "psa", "sala"),
    [("casmar-l", 529_228_336, 542_348_336), ("casmar-h", 1_090_572_592, 1_133_863_984)],
)
def test_large_presets_match_official_parameter_counts(preset, psa, sala):
    from maskar.config import load_config

    for attention, want in (("psa", psa), ("sala", sala)):
        cfg = dataclasses.replace(load_config(preset).model, head_attention=attention)
        with torch.device("meta"):
            model = CASMAR(cfg, tokenizer=StandInKL(16, 16))
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == want


def test_task_block_starts_as_plain_vit_block_and_modulates_per_task():
    from maskar.nn.vit import Block

    torch.manual_seed(0)
    blk = TaskBlock(16, 2, 4.0, 0.0, 0.0)
    blk.reset_modulation()
    ref = Block(16, 2, 4.0)
    ref.load_state_dict({k: v for k, v in blk.state_dict().items() if not k.startswith("adaLN")})
    x, c = torch.randn(2, 5, 16), torch.randn(64)
    torch.testing.assert_close(blk(x, c, 0), ref(x))
    with torch.no_grad():
        blk.adaLN_scale[1].normal_()
    torch.testing.assert_close(blk(x, c, 0), ref(x))  # task 0 untouched
    mod = c * blk.adaLN_scale[1] + blk.adaLN_shift[1]
    s1, g1, s2, g2 = mod.chunk(4, -1)
    h = x + g1 * blk.attn(blk.norm1(x) * (1 + s1))
    torch.testing.assert_close(blk(x, c, 1), h + g2 * blk.mlp(blk.norm2(h) * (1 + s2)))


def test_sequence_layout_uses_stage_rows():
    model = tiny_casmar()
    model.eval()
    b, s, n = 2, model.scaffold_len, model.seq_len
    per = model.buffer_size + s + n
    seen = []
    real_ln = model.z_proj_ln.forward
    model.z_proj_ln.forward = lambda x: (seen.append(x), real_ln(x))[1]
    scaffold = torch.randn(b, s, 32)
    tokens = torch.randn(b, n, 4)
    mask = torch.zeros(b, s + n, dtype=torch.bool)
    emb = model.class_embedding(torch.tensor([1, 2]))
    for stage in (0, 1):
        model.forward_encoder(scaffold, tokens, mask, emb, stage, 0)
        pos = model.encoder_pos_embed_learned[:, stage * per : (stage + 1) * per]
        want = (
            torch.cat([emb[:, None].expand(b, model.buffer_size, -1), scaffold, model.z_proj(tokens)], 1)
            + pos
        )
        torch.testing.assert_close(seen[-1], want)
    # decoder: mask tokens of the stage's rows fill the masked positions
    mask[:, :3] = True
    x, keep = model.forward_encoder(scaffold, tokens, mask, emb, 1, 3)
    assert keep.shape[1] == model.buffer_size + s + n - 3
    z = model.forward_decoder(x, keep, 1)
    assert z.shape == (b, s + n, 32)


def test_sincos_matches_dit_layout():
    emb = sincos_2d(8, 3, 4)  # (12, 8): first half encodes the column, second the row
    col, row = 2, 1
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    want = torch.cat([(col * omega).sin(), (col * omega).cos(), (row * omega).sin(), (row * omega).cos()])
    torch.testing.assert_close(emb[row * 4 + col], want.float())


# ----------------------------------------------------------------------------- SAMS / AMR


def test_saliency_scores_reference():
    x = torch.randn(3, 7, 5)
    a = torch.softmax(torch.einsum("nld,nmd->nlm", x, x), -1)  # no 1/sqrt(d)
    col = a.sum(1)
    want = (col - col.min(1, keepdim=True).values) / (
        col.max(1, keepdim=True).values - col.min(1, keepdim=True).values + 1e-6
    )
    torch.testing.assert_close(saliency_scores(x), want)


def test_saliency_denominator_is_official_on_low_contrast_features():
    # Official min-max normalisation: (s - min) / (max - min + 1e-6). On low-contrast features
    # (max - min of the column sums ~ 7e-3) the 1e-6 moves the saliency by ~1.5e-4.
    g = torch.Generator().manual_seed(0)
    x = 0.06 * torch.randn(2, 64, 16, generator=g)
    col = torch.softmax(x @ x.transpose(1, 2), dim=2).sum(1)
    lo, hi = col.min(1, keepdim=True).values, col.max(1, keepdim=True).values
    assert 1e-3 < float((hi - lo).min()) < 3e-2  # low contrast indeed
    want = (col - lo) / (hi - lo + 1e-6)
    got = saliency_scores(x)
    assert float((got - want).abs().max()) <= 1e-6
    assert float(((col - lo) / (hi - lo) - want).abs().max()) > 2e-5  # the old denominator is off


def test_saliency_mask_amr_ratio_and_lowest_saliency_kept():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8)
    s = saliency_scores(x)
    frac = float((s > 0.5).float().sum(1).mean()) / 16
    mask, n_masked = saliency_mask(x, 0.6, ratio_var=0.1, delta=0.5, noise=0.0)
    ratio = min(1.0, max(0.0, 0.6 - 0.1 + 0.2 * frac))
    keep = max(1, int(16 * (1 - ratio)))
    assert n_masked == 16 - keep and (mask.sum(1) == n_masked).all()
    for row in range(4):  # without noise the kept tokens are exactly the least salient
        kept = set(torch.argsort(s[row])[:keep].tolist())
        assert set((~mask[row]).nonzero().flatten().tolist()) == kept
    # ratio 1 still keeps one token; known tokens always stay visible and the ratio covers the rest
    assert saliency_mask(x, 1.2, noise=0.0)[1] == 15
    known = torch.zeros(4, 16, dtype=torch.bool)
    known[:, :5] = True
    m2, n2 = saliency_mask(x, 1.2, known=known, generator=torch.Generator().manual_seed(0))
    assert n2 == 11 and not m2[:, :5].any() and m2[:, 5:].all()
    with pytest.raises(ValueError, match="same number"):
        saliency_mask(
            x,
            0.5,
            known=torch.eye(4, 16, dtype=torch.bool) | known.roll(1, 0) & (torch.arange(4) == 0)[:, None],
        )


def test_saliency_details_follow_the_official_recipe():
    # official saliency_guided_masking: noise = rand(N, L) / 2; ids_shuffle = argsort(s + noise);
    # ids_restore = argsort(ids_shuffle); len_keep = max(1, int(L (1 - ratio))); the first
    # len_keep of ids_shuffle stay visible
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, 6, generator=g)
    u = torch.rand(3, 20, generator=g)
    mask, n_masked, d = saliency_mask(x, 0.7, uniform=u, return_details=True)
    col = torch.softmax(x @ x.transpose(1, 2), dim=2).sum(1)
    assert torch.equal(d.column_sums, col) and torch.equal(d.saliency, saliency_scores(x))
    frac = float((d.saliency > 0.5).sum(1).float().mean()) / 20
    assert d.ratio == min(1.0, max(0.0, 0.7 - 0.1 + 0.2 * frac))
    assert d.len_keep == max(1, int(20 * (1 - d.ratio))) == 20 - n_masked == 20 - d.num_masked
    assert torch.equal(d.ids_shuffle, torch.argsort(d.saliency + u / 2, dim=1)) and d.uniform is u
    assert torch.equal(d.ids_restore, torch.argsort(d.ids_shuffle, dim=1))
    official = torch.ones(3, 20)
    official[:, : d.len_keep] = 0
    assert torch.equal(torch.gather(official, 1, d.ids_restore).bool(), mask) and torch.equal(d.mask, mask)
    same, n2 = saliency_mask(x, 0.7, uniform=u)  # the draws decide everything
    assert torch.equal(same, mask) and n2 == n_masked
    with pytest.raises(ValueError, match="uniform"):
        saliency_mask(x, 0.7, uniform=u[:, :5])


def test_generate_trace_scaffold_and_sams_details():
    model = tiny_casmar()
    randomize_heads(model)
    labels = torch.tensor([1, 10])
    plain, scaffold = model.generate(labels, seed=2, cfg=2.0, re_cfg=1.5, return_scaffold=True, **SAMPLE)
    images, scaffold2, trace = model.generate(
        labels, seed=2, cfg=2.0, re_cfg=1.5, return_scaffold=True, return_trace=True, **SAMPLE
    )
    assert torch.equal(images, plain) and torch.equal(scaffold, scaffold2)
    assert [(s.stage, s.index) for s in trace] == [
        ("scaffold", 0),
        ("scaffold", 1),
        ("refine", 0),
        ("refine", 1),
    ]
    first, last = trace.select("scaffold")
    assert first.info["sams"].mask.shape == (2, model.scaffold_len) and last.info["sams"] is None
    assert torch.equal(first.info["next_mask"], first.info["sams"].mask)
    assert torch.equal(model.tokenizer.decode(last.tokens.transpose(1, 2).reshape(2, -1, 2, 2)), scaffold)
    assert trace.select("refine")[0].mask.all()  # stage 2 starts with every big token masked


def test_stage2_from_ground_truth_scaffold_latents(monkeypatch):
    # official forward_mae_encoder_stage2 with small_z=None (eval): the scaffold part is
    # cond_proj(ground-truth scaffold latents) at every position, for both CFG halves
    model = tiny_casmar()
    randomize_heads(model)
    labels = torch.tensor([3, 4])
    latents = torch.randn(2, model.token_channels, 2, 2)
    seen = []
    real = model.forward_encoder
    monkeypatch.setattr(model, "forward_encoder", lambda sc, *a: seen.append(sc.clone()) or real(sc, *a))
    big = model.sample_refine_from_latents(labels, latents, num_iter=2, cfg=2.0, num_sampling_steps="3")
    assert big.shape == (2, model.seq_len, model.token_channels) and len(seen) == 2
    want = model.cond_proj(latents.flatten(2).transpose(1, 2))
    assert all(torch.equal(sc, torch.cat([want, want])) for sc in seen)
    with pytest.raises(ValueError, match="scaffold_latents"):
        model.sample_refine_from_latents(labels, latents[:, :, :1])


def test_dit_head_official_signature_cfg_and_given_noise():
    model = tiny_casmar()
    randomize_heads(model)
    head = model.cond_diffloss
    x, z = torch.randn(4, 4, 4, 4), torch.randn(4, 32, 4, 4)
    t, y = torch.tensor([5, 9, 5, 9]), torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        out = head.net(x, t, y, z)  # official DiT.forward(x, t, y, z)
        assert torch.equal(out, head.net.forward_embedded(x, t, head.net.embed_condition(z), y))
        guided = head.net.forward_with_cfg(x, t, y, z, 3.0)
        both = head.net(torch.cat([x[:2], x[:2]]), t, y, z)
        want = both[2:] + 3.0 * (both[:2] - both[2:])  # uncond + s (cond - uncond), official order
    assert torch.equal(guided[:2], want) and torch.equal(guided[2:], want)
    # a given x_T replaces the first draw; later draws come from the generator as before
    g = torch.Generator().manual_seed(0)
    plain = head.sample(z, 1.0, 2.0, generator=g)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 4, 4, generator=g)
    given = head.sample(z, 1.0, 2.0, generator=g, noise=torch.cat([x_T, x_T]))
    assert torch.equal(given, plain)
    with pytest.raises(ValueError, match="noise"):
        head.sample(z, 1.0, 2.0, noise=x_T)


@pytest.mark.parametrize("attention", ["psa", "sala"])
def test_standalone_dit_head_and_psa_loaders(tmp_path, attention):
    from maskar.convert.casmar import load_dit_head, load_psa

    model = tiny_casmar(head_attention=attention)
    randomize_heads(model)
    full = {f"module.{k}": v for k, v in model.state_dict().items()}  # a whole checkpoint, DDP prefix
    head = load_dit_head(full, heads=model.cfg.gdm_heads, kernel_size=model.cfg.psa_kernel)
    net = model.cond_diffloss.net
    assert head.net.attention == attention and head.net.grid == net.grid
    for k, v in net.state_dict().items():
        assert torch.equal(head.net.state_dict()[k], v), k
    x, z, t = torch.randn(2, 4, 4, 4), torch.randn(2, 32, 4, 4), torch.tensor([3, 7])
    y = torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(head.net(x, t, y, z), net(x, t, y, z))
    torch.save({k[len("cond_diffloss.") :]: v for k, v in model.state_dict().items() if "cond_diffloss" in k},
               tmp_path / "head.pth")  # fmt: skip
    assert torch.equal(load_dit_head(tmp_path / "head.pth", heads=2).net.pos_embed, net.pos_embed)
    if attention == "psa":
        block = net.blocks[-1].attn.na
        kw = dict(num_heads=model.cfg.gdm_heads, kernel_size=model.cfg.psa_kernel)
        psa = load_psa(full, **kw)  # the first PSA module: block 0
        assert torch.equal(psa.q_proj.weight, net.blocks[0].attn.na.q_proj.weight)
        only = {f"na.{k}": v for k, v in block.state_dict().items()}
        psa = load_psa(only, **kw)
        tokens = torch.randn(2, 16, block.q_proj.in_features)
        with torch.no_grad():
            assert torch.equal(psa(tokens, (4, 4)), block(tokens, (4, 4)))
    with pytest.raises(Exception, match="x_embedder"):
        load_dit_head({"foo.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- training


def test_training_two_stages_weights_and_masks(monkeypatch):
    model = tiny_casmar(label_drop_prob=0.0, pred_cond_rate=1.0)
    randomize_heads(model)  # zero-initialised heads would pass no gradient back
    model.train()
    calls = []
    real_enc = model.forward_encoder

    def spy(scaffold, tokens, mask, class_emb, stage, num_masked):
        calls.append((stage, mask.clone(), num_masked, scaffold.detach().clone()))
        return real_enc(scaffold, tokens, mask, class_emb, stage, num_masked)

    monkeypatch.setattr(model, "forward_encoder", spy)
    latent, small = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 2, 2)
    out = model.forward_train(latent, small, torch.tensor([0, 1, 2]))
    (st1, m1, n1, sc1), (st2, m2, n2, sc2) = calls
    s = model.scaffold_len
    assert st1 == 0 and st2 == 1
    assert m1[:, s:].all() and n1 == m1.sum(1)[0] and (m1.sum(1) == n1).all()  # big tokens all masked
    assert not m2[:, :s].any() and (m2.sum(1) == n2).all()  # scaffold visible in stage 2
    torch.testing.assert_close(sc1, model.cond_proj(small.flatten(2).transpose(1, 2)).detach())
    # stage 2: placeholder where stage 1 saw the token, cond_z_proj(features) where it predicted
    placeholder = model.cond_proj(model.cond_tokens).detach().expand(3, -1, -1)
    visible1 = ~m1[:, :s]
    torch.testing.assert_close(sc2[visible1], placeholder[visible1])
    assert not torch.allclose(sc2[~visible1], placeholder[~visible1])
    # loss = (S/(S+N)) 2 L1 + (N/(S+N)) 0.75 L2 = 0.4 L1 + 0.6 L2 at these lengths (and at 64 / 256)
    torch.testing.assert_close(out["loss"], 0.4 * out["loss_scaffold"] + 0.6 * out["loss_refine"])
    out["loss"].backward()
    assert model.cond_z_proj.weight.grad is not None and model.cond_z_proj.weight.grad.abs().sum() > 0
    assert model.cond_diffloss.net.pos_embed.grad is None


def test_pred_cond_off_uses_placeholder_and_ramp(monkeypatch):
    model = tiny_casmar(pred_cond_rate=0.25, pred_cond_warmup_steps=100)
    model.on_train_start(0)
    assert model.pred_cond_prob() == 0.0
    assert model.on_train_step_end(50)["pred_cond_prob"] == pytest.approx(0.125)
    model.on_train_start(400)
    assert model.pred_cond_prob() == pytest.approx(0.25)
    model.on_train_start(0)  # p = 0: every sample's scaffold is the placeholder
    seen = []
    real = model.forward_encoder
    monkeypatch.setattr(model, "forward_encoder", lambda sc, *a: (seen.append(sc.detach()), real(sc, *a))[1])
    out = model.forward_train(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2), torch.tensor([0, 1]))
    torch.testing.assert_close(seen[1], model.cond_proj(model.cond_tokens).detach().expand(2, -1, -1))
    out["loss"].backward()
    assert model.cond_z_proj.weight.grad is None or model.cond_z_proj.weight.grad.abs().sum() == 0


def test_refine_head_masked_mse_fixed_variance():
    model = tiny_casmar()
    head: GlobalDiffLoss = model.cond_diffloss
    assert head.train_diffusion.var_type == "fixed_large" and head.train_diffusion.num_timesteps == 1000
    assert head.gen_diffusion().num_timesteps == 4  # respaced as configured ("250" by default)
    assert GlobalDiffLoss(head.net).gen_diffusion().num_timesteps == 250
    target, z = torch.randn(2, 4, 4, 4), torch.randn(2, 32, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    assert head(target, z, mask).item() == 0.0
    mask[:, :, 0, 0] = 1
    torch.manual_seed(0)
    part = head(target, z, mask)
    torch.manual_seed(0)
    full = head(target, z, torch.ones(2, 1, 4, 4))
    assert 0 < part.item() < full.item()  # not renormalised by the masked count


def test_scaffold_from_downsampled_image_and_cached_flip():
    model = tiny_casmar()
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(3)
    got = model.scaffold_latents_from_batch({"image": img}, None)
    torch.manual_seed(3)
    small = F.interpolate(img, size=(16, 16), mode="bicubic")
    want = model.tokenizer.sample_latent(model.tokenizer.encode_moments(small))
    torch.testing.assert_close(got, want)
    # cached: one flip decision per sample for both grids
    b = 64

    def const(v, side):  # mean v, logvar -30: the posterior sample is v
        return torch.cat([torch.full((b, 4, side, side), v), torch.full((b, 4, side, side), -30.0)], 1)

    batch = {
        "moments": const(1.0, 4),
        "moments_flip": const(2.0, 4),
        "small_moments": const(1.0, 2),
        "small_moments_flip": const(2.0, 2),
        "label": torch.zeros(b, dtype=torch.long),
    }
    seen = {}
    model.forward_train = lambda lat, sm, lab: seen.update(lat=lat, sm=sm) or {}
    model.loss(batch)
    big_flip = seen["lat"].flatten(1).mean(1) / 0.2325 > 1.5
    small_flip = seen["sm"].flatten(1).mean(1) / 0.2325 > 1.5
    assert torch.equal(big_flip, small_flip) and big_flip.any() and not big_flip.all()


def test_grad_checkpointing_gives_the_same_loss_and_grads():
    results = []
    for ckpt in (False, True):
        model = tiny_casmar(
            grad_checkpointing=ckpt, head_attention="sala", attn_dropout=0.0, proj_dropout=0.0
        )
        randomize_heads(model)
        torch.manual_seed(7)
        loss = model.forward_train(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2), torch.tensor([0, 1]))[
            "loss"
        ]
        loss.backward()
        results.append((loss.detach(), model.encoder_blocks[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_tiny_casmar_overfits_one_batch():
    torch.manual_seed(0)
    model = CASMAR(tiny_cfg(diffusion_batch_mul=4, label_drop_prob=0.0), tokenizer=StandInKL())
    latent, small = torch.randn(4, 4, 4, 4) * 0.5, torch.randn(4, 4, 2, 2) * 0.5
    labels = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model.forward_train(latent, small, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


# ----------------------------------------------------------------------------- sampling


def test_sampling_schedules_cfg_scales_and_temperature(monkeypatch):
    model = tiny_casmar()
    randomize_heads(model)
    calls1, calls2 = [], []
    real1, real2 = model.diffloss.sample, model.cond_diffloss.sample
    monkeypatch.setattr(
        model.diffloss,
        "sample",
        lambda z, t, c, **kw: (calls1.append((z.shape[0], t, c)), real1(z, t, c, **kw))[1],
    )

    def spy2(z, t, c, **kw):
        calls2.append((z.shape[0], t, c, kw["labels"].clone(), kw["known_mask"].clone()))
        return real2(z, t, c, **kw)

    monkeypatch.setattr(model.cond_diffloss, "sample", spy2)
    steps1 = SamplingTrace()
    labels = torch.tensor([3, 4])
    small, small_z, predicted = model.sample_scaffold(
        labels, num_iter=3, cfg=2.5, temperature=0.7, trace=steps1
    )
    trace1 = [int(st.mask.sum()) for st in steps1]
    assert torch.equal(steps1.steps[-1].tokens, small)
    # every scaffold token is drawn (SAMS masks are not nested: a re-masked token is drawn again)
    assert predicted.all() and sum(trace1) >= 2 * model.scaffold_len and len(trace1) == 3
    assert [c[0] for c in calls1] == [2 * k for k in trace1]  # cond + uncond rows
    assert calls1[-1][2] == pytest.approx(2.5) and all(c[1] == 0.7 for c in calls1)  # linear -> full at end
    steps2 = SamplingTrace()
    big = model.sample_refine(labels, small_z, predicted, num_iter=3, cfg=3.0, temperature=0.7, trace=steps2)
    trace2 = [int(st.mask[0].sum()) for st in steps2]
    assert torch.equal(steps2.steps[-1].tokens, big) and steps2.steps[-1].info["sams"] is None
    assert trace2[0] == model.seq_len and len(calls2) == len(trace2)
    assert calls2[-1][2] == pytest.approx(3.0)
    assert calls2[0][3].tolist() == [3, 4, 10, 10]  # DiT labels: class | null (used by SALA)
    assert not calls2[0][4].any()  # nothing known at the first step
    # every step hands the DiT the visible tokens as known and re-draws all masked ones
    assert [int((~c[4][0]).sum()) for c in calls2] == trace2
    calls1.clear()
    model.sample_scaffold(labels, num_iter=3, cfg=2.5, cfg_schedule="constant")
    assert all(c[2] == 2.5 for c in calls1)
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.sample_tokens(labels, cfg_schedule="cosine")


def test_generate_seeded_cfg_and_official_step_counts():
    model = tiny_casmar()
    randomize_heads(model)
    labels = torch.tensor([3, 10])  # 10 == class_num: unconditional
    a = model.generate(labels, seed=1, cfg=3.0, re_cfg=2.0, **SAMPLE)
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, model.generate(labels, seed=1, cfg=3.0, re_cfg=2.0, **SAMPLE))
    assert not torch.equal(a, model.generate(labels, seed=2, cfg=3.0, re_cfg=2.0, **SAMPLE))
    assert not torch.equal(a, model.generate(labels, seed=1, cfg=1.0, re_cfg=2.0, **SAMPLE))
    assert not torch.equal(a, model.generate(labels, seed=1, cfg=3.0, re_cfg=1.0, **SAMPLE))
    assert not torch.equal(a, model.generate(labels, seed=1, cfg=3.0, re_cfg=2.0, temperature=0.5, **SAMPLE))
    img, scaffold = model.generate(labels, seed=1, return_scaffold=True, **SAMPLE)
    assert scaffold.shape == (2, 3, 16, 16)
    assert model._check_sampling("linear", 4, 0) == 4 * model.cfg.cond_scale  # official: 32 at cond_scale 8


def test_cfg_halves_share_scaffold_features(monkeypatch):
    model = tiny_casmar()
    seen = []
    real = model.forward_encoder
    monkeypatch.setattr(model, "forward_encoder", lambda sc, *a: (seen.append((a[3], sc)), real(sc, *a))[1])
    _, small_z, predicted = model.sample_scaffold(torch.tensor([1, 2]), num_iter=2, cfg=2.0)
    seen.clear()
    model.sample_refine(torch.tensor([1, 2]), small_z, predicted, num_iter=1, cfg=2.0)
    stage, sc = seen[0]
    assert stage == 1 and torch.equal(sc[:2], sc[2:])
    torch.testing.assert_close(sc[:2], model.cond_z_proj(small_z))


def test_dit_head_repaint_keeps_known_and_cfg():
    model = tiny_casmar()
    randomize_heads(model)
    head = model.cond_diffloss
    z = torch.randn(2, 32, 4, 4)
    known = torch.randn(2, 4, 4, 4)
    keep = torch.rand(2, 1, 4, 4) < 0.5
    kw = dict(known=known, known_mask=keep)
    out = head.sample(z, 1.0, 1.0, **kw, paste_known=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.masked_select(keep), known.masked_select(keep))
    official = head.sample(z, 1.0, 1.0, **kw, generator=torch.Generator().manual_seed(0))
    assert torch.equal(official.masked_select(~keep), out.masked_select(~keep))
    assert not torch.allclose(official.masked_select(keep), known.masked_select(keep))  # step-0 mean
    # CFG: both halves start from the same noise and get the same guided eps (temperature 0 ->
    # no later noise, so the halves stay equal); with uncond == cond it is the unguided chain.
    zz = torch.cat([z, torch.randn_like(z)])
    guided = head.sample(zz, 0.0, 4.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(guided[:2], guided[2:])
    same = head.sample(torch.cat([z, z]), 0.0, 4.0, generator=torch.Generator().manual_seed(0))
    plain = head.sample(z, 0.0, 1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same[:2], plain)
    assert not torch.allclose(guided[:2], plain)


def test_edit_keeps_known_tokens():
    model = tiny_casmar()
    randomize_heads(model)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    keep = torch.zeros(3, 1, 32, 32, dtype=torch.bool)
    keep[0, :, :16, :] = True  # top half: 8 big, 2 scaffold tokens known
    keep[1, :, :, :20] = True  # 8 big tokens (columns 0-1), 2 scaffold tokens (column 0)
    keep[2, :, :8, :8] = True  # one big token, no scaffold token
    known = model.tokenizer.encode_mean(images).flatten(2).transpose(1, 2)
    token_keep = model.token_keep_mask(keep)
    assert token_keep.sum(1).tolist() == [8, 8, 1]
    assert model.scaffold_keep_mask(keep).sum(1).tolist() == [2, 2, 0]
    out = model.edit(images, keep, torch.tensor([1, 2, 10]), seed=0, cfg=2.0, return_tokens=True, **SAMPLE)
    torch.testing.assert_close(out[token_keep], known[token_keep])
    assert (out[~token_keep] - known[~token_keep]).abs().amax() > 0
    # the scaffold stage keeps its known tokens too
    small_img = F.interpolate(images, size=(16, 16), mode="bicubic")
    known_small = model.tokenizer.encode_mean(small_img).flatten(2).transpose(1, 2)
    small_keep = model.scaffold_keep_mask(keep)
    small, _, predicted = model.sample_scaffold(
        torch.tensor([1, 2]), num_iter=2, known=known_small[:2], known_mask=small_keep[:2]
    )
    torch.testing.assert_close(small[small_keep[:2]], known_small[:2][small_keep[:2]])
    assert torch.equal(predicted, ~small_keep[:2])
    assert model.edit(images, keep, torch.tensor([1, 2, 10]), **SAMPLE).shape == images.shape


def test_sala_variant_trains_and_samples():
    model = tiny_casmar(head_attention="sala")
    assert "cond_diffloss.net.y_embedder.embedding_table.weight" in model.state_dict()
    torch.testing.assert_close(model.cond_diffloss.net.c_pos_embed, model.cond_diffloss.net.pos_embed)
    out = model.forward_train(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2), torch.tensor([0, 1]))
    out["loss"].backward()
    assert model.cond_diffloss.net.y_embedder.embedding_table.weight.grad is not None
    randomize_heads(model)
    a = model.generate(torch.tensor([1, 2]), seed=0, cfg=2.0, **SAMPLE)
    assert torch.isfinite(a).all()


# ----------------------------------------------------------------------------- official checkpoints


def _official_file(tmp_path, model, with_args: bool) -> Path:
    return official_file(tmp_path, model, with_args, run_name="casmar_base", epoch=399)


def test_head_variant_from_official_tables():
    from maskar.checkpoint import CheckpointError
    from maskar.convert.casmar import head_variant

    tables = {n: REFERENCE / f"{n}_base_state_dict_shapes.json" for n in ("casmar", "casmar_sala", "himar")}
    if not all(p.exists() for p in tables.values()):
        pytest.skip("no reference tables")
    keys = {n: json.loads(p.read_text()) for n, p in tables.items()}
    assert head_variant(keys["casmar"]) == "psa" and head_variant(keys["casmar_sala"]) == "sala"
    with pytest.raises(CheckpointError, match="Hi-MAR"):
        head_variant(keys["himar"])
    with pytest.raises(CheckpointError, match="not a CASMAR"):
        head_variant({"fake_latent": 0})


@pytest.mark.parametrize(
    ("table", "variant"),
    [("casmar_base_state_dict_shapes.json", "psa"), ("casmar_sala_base_state_dict_shapes.json", "sala")],
)
def test_official_base_file_from_table_loads_into_base_model(tmp_path, table, variant):
    """A checkpoint-last.pth laid out from the reference table (meta tensors: no data, tiny file)
    with DDP's module. prefix and a pickled Namespace: weights_only load, variant, strict load."""
    from maskar.convert.casmar import head_variant, load_official
    from maskar.convert.mar import load_into

    path = REFERENCE / table
    if not path.exists():
        pytest.skip("no reference tables")
    shapes = json.loads(path.read_text())
    state = {f"module.{k}": torch.empty(v, device="meta") for k, v in shapes.items()}
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": state, "model_ema": state, "epoch": 399, "args": argparse.Namespace(cfg=3.0)}, ckpt)
    loaded = load_official(ckpt, trust_pickle=True)
    assert sorted(loaded) == sorted(shapes) and head_variant(loaded) == variant
    with torch.device("meta"):
        model = CASMAR(CASMARConfig(head_attention=variant), tokenizer=StandInKL(16, 16))
    load_into(model, loaded)  # strict: raises on any missing / unexpected / mis-shaped key


def test_load_official_ema_weights_only(tmp_path):
    from maskar.checkpoint import CheckpointError
    from maskar.convert.casmar import load_official
    from maskar.convert.mar import load_into

    model = tiny_casmar()
    path = _official_file(tmp_path, model, with_args=True)
    with pytest.raises(CheckpointError, match="CASMAR.*trust_pickle=true"):
        load_official(path)
    state = load_official(path, trust_pickle=True)  # model_ema by default
    fresh = tiny_casmar(label_drop_prob=0.2)
    load_into(fresh, state)
    torch.testing.assert_close(fresh.cond_tokens, model.cond_tokens + 1.0)
    torch.testing.assert_close(fresh.cond_diffloss.net.pos_embed, model.cond_diffloss.net.pos_embed + 1.0)
    raw = load_official(path, entry="model", trust_pickle=True)
    torch.testing.assert_close(raw["mask_token"], model.mask_token)


def test_convert_cli_writes_a_loadable_checkpoint(tmp_path):
    from maskar import checkpoint
    from maskar.config import load_config
    from maskar.convert import casmar as convert_casmar
    from maskar.convert import klvae as convert_klvae
    from maskar.registry import build_model

    cfg = load_config("casmar-tiny", ["model.head_attention=sala"])
    torch.manual_seed(3)
    model = build_model(cfg.model)
    src = _official_file(tmp_path, model, with_args=False)
    vae = tmp_path / "kl.ckpt"
    convert_klvae.save_official(model.tokenizer, vae)
    out = tmp_path / "converted"
    # positional SRC DST; the head variant (sala) is read from the keys
    assert convert_casmar.cli([str(src), str(out), f"vae={vae}", "preset=casmar-tiny"]) == 0
    loaded, loaded_cfg = checkpoint.load_model(out, arch="casmar")
    assert loaded_cfg.model.head_attention == "sala" and loaded_cfg.model.tokenizer_ckpt is None
    torch.testing.assert_close(loaded.fake_latent, model.fake_latent + 1.0)
    torch.testing.assert_close(loaded.tokenizer.state_dict(), model.tokenizer.state_dict())
    with pytest.raises(SystemExit, match="sala head"):
        convert_casmar.cli(
            [f"src={src}", f"out={out}2", f"vae={vae}", "preset=casmar-tiny", "model.head_attention=psa"]
        )


# ----------------------------------------------------------------------------- CLI, presets, cache


def test_cli_train_sample_edit_tiny(tmp_path):
    from PIL import Image

    from maskar.cli import main

    run = tmp_path / "run"
    common = ["train.progress=false", "train.tensorboard=false"]
    assert main(["train", "preset=casmar-tiny", "train.steps=2", f"train.out_dir={run}", *common]) == 0
    grid = tmp_path / "s.png"
    fast = ["sample.num_sampling_steps=2", "sample.refine_num_sampling_steps=2"]
    assert main(["sample", f"ckpt={run}", "labels=0,1", "per_class=1", f"out={grid}", *fast]) == 0
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    edited = tmp_path / "e.png"
    argv = ["edit", f"ckpt={run}", f"image={tmp_path / 'in.png'}", "mask=box:0.25,0.25,0.75,0.75", "n=1"]
    assert main(argv + [f"out={edited}", *fast]) == 0
    assert grid.is_file() and edited.is_file()


def test_latent_cache_has_both_grids(tmp_path):
    from maskar.config import load_config
    from maskar.data.latent_store import LatentDataset
    from maskar.models.casmar import cache_latents_for

    mcfg = load_config("casmar-tiny").model

    class Images(torch.utils.data.Dataset):
        num_classes = 10

        def __len__(self):
            return 3

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"image": torch.rand(3, 32, 32, generator=g) * 2 - 1, "label": torch.tensor(i)}

    cache_latents_for(mcfg, Images(), str(tmp_path / "lat"), batch_size=2)
    item = LatentDataset(tmp_path / "lat")[1]
    assert item["moments"].shape == (8, 4, 4) and item["small_moments"].shape == (8, 2, 2)
    assert item["small_moments_flip"].shape == (8, 2, 2) and item["moments_flip"].shape == (8, 4, 4)


def test_presets_and_config_validation():
    from maskar.config import ConfigError, load_config

    b = load_config("casmar-b")
    assert (b.model.cond_scale, b.model.gdm_w, b.model.gdm_heads, b.model.psa_kernel) == (8, 512, 8, 7)
    assert b.sample.num_iter == 4 and b.sample.refine_num_sampling_steps == "250"
    assert load_config("casmar-h").sample.num_iter == 12
    assert load_config("casmar-sala-b").model.head_attention == "sala"
    assert load_config("casmar-fmnist").model.cond_scale == 4
    with pytest.raises(ConfigError, match="psa_kernel"):
        load_config("casmar-tiny", ["model.psa_kernel=4"])
    with pytest.raises(ConfigError, match="patch_size"):
        load_config("casmar-tiny", ["model.patch_size=2"])
    with pytest.raises(ConfigError, match="refine_num_sampling_steps"):
        load_config("casmar-tiny", ["sample.refine_num_sampling_steps=abc"])
    assert math.isclose(tiny_casmar().cfg.mask_ratio_var, 0.1)
