"""VAR: blocks, masks, KV-cache sampling == teacher forcing, sampling helpers, editing, converters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers_nextscale import REF, meta_official, random_indices, randomize

from maskar.config import build, load_config
from maskar.convert import var as convert_var
from maskar.models.var import VAR, VARConfig
from maskar.nn.attention import ScalePattern
from maskar.nn.blocks import AdaLNBeforeHead, AdaLNSelfAttnBlock
from maskar.nn.sampling import filter_logits, sample_from_logits

TINY_TOKENIZER = dict(
    arch="vqvae", resolution=8, ch=16, ch_mult=[1, 2], norm_groups=8, z_channels=8, vocab_size=64,
    patch_nums=[1, 2, 4], enc_res_blocks=1, dec_res_blocks=1, mid_attn=False,
    enc_attn_levels=[], dec_attn_levels=[],
)  # fmt: skip


def tiny_var(**kw) -> VAR:
    torch.manual_seed(0)
    cfg = build(VARConfig, dict(arch="var", tokenizer=TINY_TOKENIZER, depth=2, width=32, heads=2, **kw))
    return VAR(cfg).eval()


# ----------------------------------------------------------------------------- blocks


def _reference_block(block: AdaLNSelfAttnBlock, x, cond, mask):
    """Straightforward re-statement of the official block math, fp32, explicit softmax."""
    C, H = block.dim, block.attn.num_heads
    D = C // H
    mod = block.ada_lin(cond).view(-1, 1, 6, C)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (mod[:, :, i] for i in range(6))
    ln = lambda t: F.layer_norm(t, (C,), eps=1e-6)  # noqa: E731
    h = ln(x) * (1 + scale1) + shift1
    a = block.attn
    qkv = h @ a.mat_qkv.weight.t() + torch.cat([a.q_bias, torch.zeros(C), a.v_bias])
    q, k, v = qkv.view(*x.shape[:2], 3, H, D).permute(2, 0, 3, 1, 4)
    q = q / q.norm(dim=-1, keepdim=True) * torch.exp(torch.clamp(a.scale_mul_1H11, max=math.log(100)))
    k = k / k.norm(dim=-1, keepdim=True)
    s = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))  # softmax scale 1
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    x = x + (o @ a.proj.weight.t() + a.proj.bias) * gamma1
    h = ln(x) * (1 + scale2) + shift2
    f = block.ffn
    y = h @ f.fc1.weight.t() + f.fc1.bias
    y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
    return x + (y @ f.fc2.weight.t() + f.fc2.bias) * gamma2


def test_block_matches_reference_math():
    torch.manual_seed(0)
    block = AdaLNSelfAttnBlock(32, 32, 4).eval()
    randomize(block)
    with torch.no_grad():
        block.attn.scale_mul_1H11[0, 0] = 10.0  # above ln(100): must be clamped
    pattern = ScalePattern.from_sides("block_causal", (1, 2, 3))
    x, cond = torch.randn(2, 14, 32), torch.randn(2, 32)
    got = block(x, cond, pattern)
    want = _reference_block(block, x, cond, pattern.dense_mask())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_head_chunk_order_and_no_affine_norm():
    head = AdaLNBeforeHead(8, 8)
    randomize(head)
    x, cond = torch.randn(2, 3, 8), torch.randn(2, 8)
    scale, shift = head.ada_lin(cond).view(2, 1, 2, 8).unbind(2)
    want = F.layer_norm(x, (8,), eps=1e-6) * (1 + scale) + shift
    torch.testing.assert_close(head(x, cond), want)
    assert not any(p for p in head.ln_wo_grad.parameters())


def test_shared_aln_block_uses_ada_gss():
    block = AdaLNSelfAttnBlock(16, 16, 2, shared_aln=True)
    assert not hasattr(block, "ada_lin") and block.ada_gss.shape == (1, 1, 6, 16)
    out = block(torch.randn(2, 5, 16), torch.randn(2, 1, 6, 16))
    assert out.shape == (2, 5, 16)


# ----------------------------------------------------------------------------- masks


def test_masks_equal_direct_construction():
    sides = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    scale_of = [si for si, pn in enumerate(sides) for _ in range(pn * pn)]
    L = len(scale_of)
    causal = torch.tensor([[scale_of[i] >= scale_of[j] for j in range(L)] for i in range(L)])
    diag = torch.tensor([[scale_of[i] == scale_of[j] for j in range(L)] for i in range(L)])
    assert torch.equal(ScalePattern.from_sides("block_causal", sides).dense_mask(), causal)
    assert torch.equal(ScalePattern.from_sides("block_diagonal", sides).dense_mask(), diag)
    assert abs(causal.float().mean().item() - 0.619) < 1e-3 and abs(diag.float().mean().item() - 0.239) < 1e-3
    bias = convert_var.official_buffers(ScalePattern.from_sides("block_causal", sides), [], 4)
    assert torch.equal(bias["attn_bias_for_masking"][0, 0] == 0, causal)
    assert torch.equal(bias["lvl_1L"][0], torch.tensor(scale_of))


def test_model_buffers_are_derived_and_not_saved():
    m = tiny_var()
    assert torch.equal(m.lvl_1L[0], torch.tensor([0] + [1] * 4 + [2] * 16))
    sd = m.state_dict()
    assert "lvl_1L" not in sd and not any(k.endswith("zero_k_bias") for k in sd)


# ----------------------------------------------------------------------------- inference == training


def test_kv_cache_inference_equals_block_causal_forward():
    m = tiny_var(cond_drop_rate=0.0)
    randomize(m)
    B = 3
    labels = torch.tensor([0, 5, m.num_classes])
    gt = random_indices(m, B)
    with torch.no_grad():
        want = m(labels, m.tokenizer.teacher_forcing_input(gt))  # (B, L, V)
    keep = [torch.ones(B, pn * pn, dtype=torch.bool) for pn in m.patch_nums]
    collected: list[torch.Tensor] = []
    args = m._sampling_args(0.0, "linear", 1.0, 0, 0.0, 0, "cpu")
    m._autoregress(labels, args, known=gt, keep=keep, collect=collected)
    got = torch.cat(collected, dim=1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_trace_records_every_scale_and_changes_nothing():
    m = tiny_var()
    randomize(m)
    labels = torch.tensor([0, 3, m.num_classes])
    plain = m.generate(labels, cfg=2.0, top_k=5, seed=7)
    images, trace = m.generate(labels, cfg=2.0, top_k=5, seed=7, return_trace=True, trace_logits=True)
    assert torch.equal(images, plain)  # tracing draws nothing and reorders nothing
    assert [(s.stage, s.index) for s in trace] == [("next_scale", si) for si in range(len(m.patch_nums))]
    final = []
    for si, step in enumerate(trace):
        n = m.patch_nums[si] ** 2
        assert step.tokens.shape == step.mask.shape == (3, n) and step.mask.all()
        assert step.logits.shape == (3, n, m.vocab_size)
        assert step.info["cfg"] == pytest.approx(2.0 * si / (len(m.patch_nums) - 1))
        assert torch.equal(step.info["final_tokens"], step.tokens)  # VAR has no refinement
        final.append(step.tokens)
    fhats = m.tokenizer.indices_to_fhats(final)
    assert all(torch.equal(s.info["f_hat"], f) for s, f in zip(trace, fhats))
    assert torch.equal(m.tokenizer.fhat_to_img(trace.steps[-1].info["f_hat"]), images)
    assert m.generate(labels, seed=7, return_trace=True)[1].steps[0].logits is None


def test_generate_from_given_tokens_is_teacher_forcing():
    m = tiny_var(cond_drop_rate=0.0)
    randomize(m)
    B = 2
    labels = torch.tensor([1, 4])
    gt = random_indices(m, B, seed=3)
    with torch.no_grad():
        want = m(labels, m.tokenizer.teacher_forcing_input(gt))
    keep = [torch.ones(B, pn * pn, dtype=torch.bool) for pn in m.patch_nums]
    images, trace = m.generate(labels, cfg=0.0, known=gt, keep=keep, return_trace=True, trace_logits=True)
    torch.testing.assert_close(torch.cat([s.logits for s in trace], 1), want, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(s.tokens, g) and not s.mask.any() for s, g in zip(trace, gt))
    torch.testing.assert_close(images, m.tokenizer.indices_to_img(gt))
    # partial: kept positions are the given ids, the others are drawn
    part = [torch.rand(B, pn * pn) < 0.5 for pn in m.patch_nums]
    _, trace = m.generate(labels, known=gt, keep=part, return_trace=True)
    for s, g, k in zip(trace, gt, part):
        assert torch.equal(s.tokens[k], g[k]) and torch.equal(s.mask, ~k)
    with pytest.raises(ValueError, match=r"known\[1\] / keep\[1\]: expected \(2, 4\)"):
        m.generate(labels, known=gt, keep=[keep[0], keep[1][:, :3], keep[2]])
    with pytest.raises(ValueError, match="together"):
        m.generate(labels, known=gt)


# ----------------------------------------------------------------------------- sampling helpers


def test_filter_logits_is_not_in_place_and_follows_var_rules():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    orig = logits.clone()
    k2 = filter_logits(logits, top_k=2)
    assert torch.equal(logits, orig)
    assert torch.isinf(k2[0, :3]).all() and torch.equal(k2[0, 3:], logits[0, 3:])
    p = logits.softmax(-1)[0]  # ascending cumulative mass: drop while <= 1 - top_p
    top_p = 1 - (p[0] + p[1] + p[2]).item() - 1e-6
    kept = ~torch.isinf(filter_logits(logits, top_p=top_p))[0]
    assert kept.tolist() == [False, False, False, True, True]
    assert (~torch.isinf(filter_logits(logits, top_p=1e-9))[0]).tolist() == [False] * 4 + [True]


def test_sampling_is_seeded_and_temperature_sharpens():
    logits = torch.randn(4, 7, 50)
    a = sample_from_logits(logits, 10, 0.9, 1.0, torch.Generator().manual_seed(3))
    b = sample_from_logits(logits, 10, 0.9, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (4, 7)
    cold = sample_from_logits(logits, 0, 0.0, 1e-4, torch.Generator().manual_seed(0))
    assert torch.equal(cold, logits.argmax(-1))


def test_generate_seeded_and_argument_validation():
    m = tiny_var()
    labels = torch.tensor([1, 2])
    a = m.generate(labels, cfg=2.0, top_k=8, seed=7)
    b = m.generate(labels, cfg=2.0, top_k=8, seed=7)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    with pytest.raises(ValueError, match="top_p"):
        m.generate(labels, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(labels, temperature=0.0)
    with pytest.raises(ValueError, match="cfg"):
        m.generate(labels, cfg=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(labels, top_k=-3)
    with pytest.raises(ValueError, match="cfg_schedule"):
        m.generate(labels, cfg_schedule="cosine")
    with pytest.raises(ValueError, match="labels"):
        m.generate(torch.tensor([m.num_classes + 1]))
    with pytest.raises(TypeError, match="mask_schedule"):
        m.generate(labels, mask_schedule=[[1], [4], [16]])


def test_decoding_in_chunks_gives_the_same_images(monkeypatch):
    """Sampling decodes in chunks of DECODE_PIXELS output pixels; the images do not depend on it."""
    import maskar.models.var as var_mod

    m = tiny_var()
    labels = torch.tensor([1, 2, 3, 4, 5])
    whole = m.generate(labels, cfg=2.0, top_k=8, seed=3)
    calls = []
    real = m.tokenizer.fhat_to_img
    monkeypatch.setattr(m.tokenizer, "fhat_to_img", lambda f, *a: calls.append(f.shape[0]) or real(f, *a))
    monkeypatch.setattr(var_mod, "DECODE_PIXELS", 2 * 8 * 8)  # two 8x8 images per chunk
    chunked = m.generate(labels, cfg=2.0, top_k=8, seed=3)
    assert calls == [2, 2, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)  # conv rounding only


def test_guidance_is_linear_in_scale():
    m = tiny_var()
    assert [m.guidance(2.0, si, "linear") for si in range(3)] == [0.0, 1.0, 2.0]
    assert m.guidance(2.0, 0, "constant") == 2.0


# ----------------------------------------------------------------------------- editing


def test_edit_keeps_known_tokens_exactly():
    m = tiny_var()
    randomize(m)
    B = 2
    images = torch.rand(B, 3, 8, 8) * 2 - 1
    keep_mask = torch.zeros(B, 1, 8, 8, dtype=torch.bool)
    keep_mask[..., :, :4] = True  # keep the left half
    known = m.tokenizer.img_to_indices(images)
    keep = m.keep_masks(keep_mask)
    assert keep[0].all()  # pn^2 <= 3: always kept
    assert keep[1].view(B, 2, 2)[:, :, 0].all() and not keep[1].view(B, 2, 2)[:, :, 1].any()
    assert keep[2].view(B, 4, 4)[:, :, :2].all() and not keep[2].view(B, 4, 4)[:, :, 2:].any()
    final: list[torch.Tensor] = []
    args = m._sampling_args(1.0, "linear", 1.0, 0, 0.0, 0, "cpu")
    m._autoregress(torch.tensor([m.num_classes] * B), args, known, keep, out_indices=final)
    for si in range(len(m.patch_nums)):
        assert torch.equal(final[si][keep[si]], known[si][keep[si]])
    assert not torch.equal(final[2], known[2])  # the unknown half was sampled
    out = m.edit(images, keep_mask, torch.tensor([3, m.num_classes]), seed=1, top_k=5)
    assert out.shape == images.shape


def test_keep_mask_resizing_rule():
    m = tiny_var()
    keep_mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    keep_mask[..., :2, :] = True  # a quarter: at 2x2 bilinear gives 0.5, not > 0.5
    masks = m.keep_masks(keep_mask)
    assert masks[0].all()  # pn^2 = 1 <= 3: always kept
    assert not masks[1].any()
    with pytest.raises(ValueError, match="keep_mask"):
        m.keep_masks(torch.ones(1, 8, 8, dtype=torch.bool))


# ----------------------------------------------------------------------------- training


def test_tiny_var_overfits_one_batch():
    torch.manual_seed(0)
    m = tiny_var(cond_drop_rate=0.0, drop_path_rate=0.0).train()
    batch = {"indices": torch.cat(random_indices(m, 4), dim=1), "label": torch.tensor([0, 1, 2, 3])}
    opt = torch.optim.AdamW([p for _, p in m.named_trainable_parameters()], lr=3e-3)
    first = m.loss(batch)["loss"].item()
    for _ in range(60):
        loss = m.loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and loss.item() < 0.3 * first, (first, loss.item())
    assert not any(p.grad is not None for n, p in m.named_parameters() if n.startswith("tokenizer."))


def test_loss_from_images_and_label_dropout():
    m = tiny_var(cond_drop_rate=1.0).train()
    out = m.loss({"image": torch.rand(2, 3, 8, 8) * 2 - 1, "label": torch.tensor([0, 1])})
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert torch.equal(m.drop_labels(torch.tensor([0, 1])), torch.tensor([m.num_classes] * 2))
    assert "pos_1LC" in m.no_weight_decay_keywords() and "scale_mul" in m.no_weight_decay_keywords()


def test_presets_build():
    cfg = load_config("var-tiny")
    from maskar.registry import build_model

    m = build_model(cfg.model)
    assert isinstance(m, VAR) and m.image_size == 16
    d36 = load_config("var-d36").model
    assert d36.shared_aln and d36.C == 2304 and d36.tokenizer.patch_nums[-1] == 32


# ----------------------------------------------------------------------------- official checkpoints


@pytest.mark.skipif(not (REF / "var_d16_state_dict_shapes.json").exists(), reason="reference tables absent")
def test_var_d16_shape_table_loads_strictly():
    """Keys and shapes of official var_d16.pth load strictly (on the meta device: no memory, no time)."""
    sd = meta_official("var_d16_state_dict_shapes.json")
    cfg = convert_var.infer_var_config(sd)
    assert (cfg.depth, cfg.C, cfg.shared_aln) == (16, 1024, False)
    with torch.device("meta"):
        model = VAR(cfg)
    ours = convert_var.check_and_drop_buffers(sd, model.pattern, "test")
    ours.update({f"tokenizer.{k}": v for k, v in model.tokenizer.state_dict().items()})
    model.load_state_dict(ours, strict=True, assign=True)
    n = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("tokenizer."))
    assert n == 310_283_520
    back, _ = convert_var.export_official(model)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_var_convert_round_trip_and_buffer_checks(tmp_path):
    m = tiny_var()
    randomize(m)
    tf, vae = convert_var.export_official(m)
    assert tf["attn_bias_for_masking"].shape == (1, 1, 21, 21) and "blocks.0.attn.zero_k_bias" in tf
    torch.save(tf, tmp_path / "var.pth")
    torch.save(vae, tmp_path / "vae.pth")
    back = convert_var.load_official(tmp_path / "var.pth", tmp_path / "vae.pth", cfg=m.cfg)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    bad = dict(tf)
    bad["attn_bias_for_masking"] = convert_var.official_buffers(
        ScalePattern.from_sides("block_diagonal", m.patch_nums), [], 4
    )["attn_bias_for_masking"]
    with pytest.raises(Exception, match="block_causal"):
        convert_var.load_official(bad, vae, cfg=m.cfg)
    broken = {k: v for k, v in tf.items() if k != "head.bias"}
    with pytest.raises(Exception, match="head.bias"):
        convert_var.load_official(broken, vae, cfg=m.cfg)


def test_convert_cli_round_trip(tmp_path):
    from maskar.checkpoint import load_model
    from maskar.registry import build_model

    torch.manual_seed(0)
    m = build_model(load_config("var-tiny").model)
    randomize(m)
    tf, vae = convert_var.export_official(m)
    torch.save(tf, tmp_path / "var.pth")
    torch.save(vae, tmp_path / "vae.pth")
    src, out = tmp_path / "var.pth", tmp_path / "ckpt"
    vae_path = tmp_path / "vae.pth"
    assert convert_var.cli([f"src={src}", f"vae={vae_path}", f"out={out}", "preset=var-tiny"]) == 0
    back, cfg = load_model(out, device="cpu")
    assert cfg.sample.top_k == 0  # the preset's sampling section
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert convert_var.cli([f"ckpt={out}", f"out={tmp_path / 'again.pth'}"]) == 0
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert again.keys() == tf.keys() and all(torch.equal(again[k], tf[k]) for k in tf)
    with pytest.raises(SystemExit, match="vae="):
        convert_var.cli([f"src={src}", f"out={out}"])
    # key=value overrides on top of the preset (model.* and sample.*)
    argv = [f"src={src}", f"vae={vae_path}", f"out={tmp_path / 'o2'}", "preset=var-tiny", "sample.cfg=3.5"]
    assert convert_var.cli([*argv, "model.cond_drop_rate=0.0"]) == 0
    _, cfg2 = load_model(tmp_path / "o2", device="cpu")
    assert cfg2.sample.cfg == 3.5 and cfg2.model.cond_drop_rate == 0.0
    with pytest.raises(SystemExit, match="unknown argument 'train.lr'"):
        convert_var.cli([*argv, "train.lr=1"])
    with pytest.raises(SystemExit, match="'mar' model, not 'var'"):
        convert_var.cli([f"src={src}", f"vae={vae_path}", f"out={out}", "preset=mar-tiny"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kv_cache_sampling_matches_forward_in_bf16():
    from maskar.nn.attention import set_backend

    m = tiny_var(cond_drop_rate=0.0).cuda()
    randomize(m)
    set_backend(m, "auto")
    labels = torch.tensor([0, 5], device="cuda")
    gt = [g.cuda() for g in random_indices(m, 2)]
    keep = [torch.ones(2, pn * pn, dtype=torch.bool, device="cuda") for pn in m.patch_nums]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = m(labels, m.tokenizer.teacher_forcing_input(gt))
        got: list[torch.Tensor] = []
        m._autoregress(labels, m._sampling_args(0.0, "linear", 1.0, 0, 0.0, 0, "cuda"), gt, keep, collect=got)
    assert (torch.cat(got, 1) - want).abs().max() < 5e-2 * want.abs().max()


def test_attention_gets_one_compute_dtype_under_autocast(monkeypatch):
    """L2-normalised q/k are cast back to the autocast dtype, so fused kernels can take them."""
    import maskar.nn.blocks as blocks

    seen = []
    real = blocks.attention

    def spy(q, k, v, pattern=None, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, pattern, **kw)

    monkeypatch.setattr(blocks, "attention", spy)
    block = AdaLNSelfAttnBlock(32, 32, 2, 4.0, 0.0, attn_l2_norm=True)
    x, cond = torch.randn(2, 5, 32), torch.randn(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, cond, ScalePattern.from_sides("block_diagonal", (1, 2)))
    assert seen == [(torch.bfloat16,) * 3]
