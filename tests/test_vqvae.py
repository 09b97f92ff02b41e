"""Multi-scale residual VQ-VAE: official layout, quantiser maths, generator helpers, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_tables import REFERENCE

from maskar.config import ConfigError, build
from maskar.convert import vqvae as convert_vqvae
from maskar.tokenizers.losses import psnr
from maskar.tokenizers.vqvae import MultiScaleVQVAE, VQVAEConfig


def tiny_cfg(**kw) -> VQVAEConfig:
    base = dict(
        resolution=16,
        ch=8,
        ch_mult=(1, 2),
        enc_res_blocks=1,
        dec_res_blocks=2,
        norm_groups=4,
        z_channels=4,
        vocab_size=32,
        patch_nums=(1, 2, 3, 5, 8),
        share_quant_resi=4,
        dead_code_steps=0,
    )
    base.update(kw)
    return build(VQVAEConfig, base, "model")


@pytest.fixture(scope="module")
def tiny() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    m = MultiScaleVQVAE(tiny_cfg()).eval()
    with torch.no_grad():  # a codebook of realistic spread (the default init is tiny)
        m.quantize.embedding.weight.normal_()
    return m


def random_ids(m: MultiScaleVQVAE, B: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, m.vocab_size, (B, pn * pn), generator=g) for pn in m.patch_nums]


def ref_contribution(m: MultiScaleVQVAE, si: int, idx: torch.Tensor) -> torch.Tensor:
    """phi_k(bicubic_up(embed)) written out with plain torch calls."""
    pn, side, K = m.patch_nums[si], m.patch_nums[-1], len(m.patch_nums)
    h = m.quantize.embedding.weight[idx].view(idx.shape[0], pn, pn, -1).permute(0, 3, 1, 2)
    if si != K - 1:
        h = F.interpolate(h, size=(side, side), mode="bicubic", align_corners=False)
    # share_quant_resi = 4. Float64 numpy like the official code: at si/(K-1) = 0.5 the two
    # middle ticks tie and the float64 rounding decides.
    ticks = np.linspace(1 / 12, 11 / 12, 4)
    conv = m.quantize.quant_resi.qresi_ls[int(np.abs(ticks - si / (K - 1)).argmin())]
    return 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)


# ----------------------------------------------------------------------------- official layout


def test_official_shapes_load_strictly_and_round_trip():
    path = REFERENCE / "var_vqvae_state_dict_shapes.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    table = json.loads(path.read_text())
    shapes = table["state_dict_shapes"]
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v, generator=g) for k, v in shapes.items()}
    model = convert_vqvae.load_official(sd)
    assert sum(p.numel() for p in model.parameters()) == table["_meta"]["n_params"]["total"]
    out = convert_vqvae.export_official(model)
    assert set(out) == set(sd)
    for k in sd:
        assert torch.equal(out[k], sd[k]), k
    # Tick rule of the 4 shared phi convs over 10 scales (reference table).
    K = len(model.patch_nums)
    assert [model.quantize.quant_resi.index(si, K) for si in range(K)] == table["_meta"][
        "phi_index_used_per_scale_K10"
    ]


def test_official_512_schedule_and_lenient_hit_buffer():
    cfg = convert_vqvae.official_config(512)
    assert cfg.patch_nums == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    # A hit buffer from another schedule is replaced (derived statistics), the rest strict.
    src = MultiScaleVQVAE(tiny_cfg(patch_nums=(1, 2, 4, 8)))
    sd = convert_vqvae.export_official(src)
    dst = convert_vqvae.load_official(sd, tiny_cfg())
    assert dst.quantize.ema_vocab_hit_SV.shape == (5, 32)
    assert torch.equal(dst.quantize.embedding.weight, src.quantize.embedding.weight)
    sd.pop("quant_conv.weight")
    with pytest.raises(ConfigError, match="missing"):
        convert_vqvae.load_official(sd, tiny_cfg())


def test_config_validation():
    with pytest.raises(ConfigError, match="strictly increasing"):
        tiny_cfg(patch_nums=(1, 3, 3, 8))
    with pytest.raises(ConfigError, match="resolution"):
        tiny_cfg(patch_nums=(1, 2, 4))
    with pytest.raises(ConfigError, match="norm_groups"):
        tiny_cfg(norm_groups=3)


# ----------------------------------------------------------------------------- quantiser maths


def test_fhat_is_sum_of_per_scale_contributions(tiny):
    torch.manual_seed(1)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        f = tiny.encode_features(img)
        f_hat, ids, _, _ = tiny.quantize.quantize(f)
        assert [i.shape for i in ids] == [(2, pn * pn) for pn in tiny.patch_nums]
        manual = sum(ref_contribution(tiny, si, idx) for si, idx in enumerate(ids))
        torch.testing.assert_close(f_hat, manual, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tiny.indices_to_fhat(ids), manual, rtol=1e-5, atol=1e-5)
        # Each scale's ids are the nearest codes of the area-downsampled residual.
        rest = f.clone()
        for si, pn in enumerate(tiny.patch_nums):
            z = F.interpolate(rest, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, 4)
            d = torch.cdist(z, tiny.quantize.embedding.weight)
            assert torch.equal(d.argmin(1).view(2, -1), ids[si])
            rest = rest - ref_contribution(tiny, si, ids[si])
        # Decoding tokens equals the reconstruction path.
        torch.testing.assert_close(tiny.indices_to_img(ids), tiny(img), rtol=1e-5, atol=1e-5)


def test_teacher_forcing_input_matches_loop(tiny):
    ids = random_ids(tiny)
    with torch.no_grad():
        got = tiny.teacher_forcing_input(ids)
        L = sum(pn * pn for pn in tiny.patch_nums)
        assert got.shape == (2, L - 1, 4)
        pieces, acc = [], torch.zeros(2, 4, 8, 8)
        for si in range(len(tiny.patch_nums) - 1):
            acc = acc + ref_contribution(tiny, si, ids[si])
            nxt = tiny.patch_nums[si + 1]
            pieces.append(F.interpolate(acc, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
        torch.testing.assert_close(got, torch.cat(pieces, 1), rtol=1e-5, atol=1e-5)


def test_next_input_matches_batch_computation(tiny):
    ids = random_ids(tiny, seed=3)
    with torch.no_grad():
        fhat = torch.zeros(2, 4, 8, 8)
        inputs, fhats = [], []
        for si in range(len(tiny.patch_nums)):
            h = tiny.embed_map(ids[si], si)
            torch.testing.assert_close(h.permute(0, 2, 3, 1).reshape(2, -1, 4), tiny.lookup(ids[si]))
            fhat, nxt = tiny.next_input(si, fhat, h)
            if si < len(tiny.patch_nums) - 1:
                assert nxt.shape == (2, 4, tiny.patch_nums[si + 1], tiny.patch_nums[si + 1])
                inputs.append(nxt.flatten(2).transpose(1, 2))
            else:
                assert nxt is fhat  # official: the last scale's "next input" is f_hat itself
            fhats.append(fhat)
        torch.testing.assert_close(
            torch.cat(inputs, 1), tiny.teacher_forcing_input(ids), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(fhat, tiny.indices_to_fhat(ids), rtol=1e-5, atol=1e-5)
        # per-scale f_hat and images (official embed_to_fhat / idxBl_to_img with last_one=False)
        per_scale = tiny.indices_to_fhats(ids)
        assert len(per_scale) == len(tiny.patch_nums)
        for got, want in zip(per_scale, fhats):
            assert torch.equal(got, want)  # the sampling loop's f_hat after each scale
        imgs = tiny.indices_to_imgs(ids)
        assert all(torch.equal(i, tiny.fhat_to_img(f)) for i, f in zip(imgs, per_scale))
        assert torch.equal(imgs[-1], tiny.indices_to_img(ids))


def test_own_residual_input_matches_loop(tiny):
    ids = random_ids(tiny, seed=4)
    with torch.no_grad():
        got = tiny.own_residual_input(ids)
        pieces = []
        for si in range(1, len(tiny.patch_nums)):
            pn = tiny.patch_nums[si]
            c = F.interpolate(ref_contribution(tiny, si, ids[si]), size=(pn, pn), mode="area")
            torch.testing.assert_close(
                tiny.own_residual(si, tiny.embed_map(ids[si], si)), c, rtol=1e-5, atol=1e-5
            )
            pieces.append(c.flatten(2).transpose(1, 2))
        torch.testing.assert_close(got, torch.cat(pieces, 1), rtol=1e-5, atol=1e-5)


def test_bad_indices_raise(tiny):
    ids = random_ids(tiny)
    with pytest.raises(ValueError, match="one per scale"):
        tiny.indices_to_fhat(ids[:-1])
    ids[1] = ids[1][:, :3]
    with pytest.raises(ValueError, match=r"indices\[1\]"):
        tiny.teacher_forcing_input(ids)


# ----------------------------------------------------------------------------- training


def _digits_batch(n: int = 64) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 16 * 2 - 1  # (n, 8, 8)
    return F.interpolate(x[:, None], size=(16, 16), mode="bilinear").expand(-1, 3, -1, -1).contiguous()


def test_tiny_tokenizer_loss_falls():
    torch.manual_seed(0)
    model = MultiScaleVQVAE(tiny_cfg(dead_code_steps=5, usage_window=5))
    img = _digits_batch(32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        out = model.loss({"image": img})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        logs = model.on_train_step_end(step)
        losses.append(out["loss"].item())
    assert {"l1", "l2", "vq", "commit", "psnr"} <= set(out)
    assert {f"usage_s{k}" for k in range(5)} <= set(logs)
    assert all(0.0 <= logs[f"usage_s{k}"] <= 1.0 for k in range(5))
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses

    # indices -> image -> indices on the tokenizer's own decodes. The multi-scale residual
    # quantiser is not an exact projection (area-down of a bicubic-up is not the identity),
    # so stability is approximate: re-encoding a decode must move it far less than the
    # reconstruction error, and most tokens must come back unchanged.
    model.eval()
    with torch.no_grad():
        ids = model.img_to_indices(img)
        dec = model.indices_to_img(ids)
        ids2 = model.img_to_indices(dec)
        dec2 = model.indices_to_img(ids2)
    same = torch.cat([(a == b).flatten() for a, b in zip(ids, ids2)]).float().mean()
    assert torch.equal(ids[0], ids2[0]) and same > 0.5, same
    assert psnr(dec2, dec) > psnr(dec, img) + 5.0


def test_dead_codes_are_reinitialised_from_recent_residuals():
    torch.manual_seed(0)
    model = MultiScaleVQVAE(tiny_cfg(dead_code_steps=2, usage_window=2))
    img = _digits_batch(8)
    before = model.quantize.embedding.weight.detach().clone()
    reinit = 0.0
    for step in range(4):
        model.loss({"image": img})
        reinit += model.on_train_step_end(step)["dead_reinit"]
    after = model.quantize.embedding.weight.detach()
    changed = (after != before).any(1)
    assert reinit > 0 and int(changed.sum()) == int(reinit)
    # Re-initialised codes are residual vectors of the encoder output, far from the tiny init.
    assert after[changed].abs().max() > 10 / model.vocab_size


def test_discriminator_path_and_export_drops_it():
    torch.manual_seed(0)
    model = MultiScaleVQVAE(tiny_cfg(disc_weight=0.5, disc_ch=8, disc_layers=2, disc_start=1))
    batch = {"image": _digits_batch(4)}
    assert model.disc_parameters()
    out = model.loss(batch)
    assert float(out["gan_weight"]) == 0.0  # before disc_start
    d = model.disc_loss(batch)
    assert float(d["loss"].detach()) == 0.0 and d["loss"].requires_grad
    model.on_train_step_end(1)
    out = model.loss(batch)
    assert float(out["gan_weight"]) > 0.0
    out["loss"].backward()
    assert model.decoder.conv_out.weight.grad is not None
    d = model.disc_loss(batch)
    d["loss"].backward()
    assert all(p.grad is not None for p in model.disc_parameters())
    assert not any(k.startswith("train_losses") for k in convert_vqvae.export_official(model))
    assert "quantize.embedding" in model.no_weight_decay_keywords()


def test_tokenizer_quality_bench_on_a_saved_checkpoint(tmp_path, capsys):
    from maskar.bench import tokenizer_quality
    from maskar.checkpoint import save_model
    from maskar.config import Config, to_dict

    cfg = tiny_cfg(image_channels=1)
    model = MultiScaleVQVAE(cfg)
    full = build(Config, {"model": to_dict(cfg), "data": {"name": "digits", "resolution": 16, "channels": 1}})
    save_model(tmp_path / "tok", model, full)
    assert (
        tokenizer_quality.main([str(tmp_path / "tok"), "limit=20", "device=cpu", f"json={tmp_path}/r.json"])
        == 0
    )
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["images"] == 20 and len(res["scales"]) == 5
    assert res["scales"][0]["usage"] <= 20 / 32 + 1e-9  # at most one code per image at 1x1
    assert "PSNR" in capsys.readouterr().out


def test_perceptual_loss_from_user_weight_files(tmp_path):
    from maskar.tokenizers.losses import _VGG16_CONVS, LPIPS

    g = torch.Generator().manual_seed(0)
    vgg = {}
    for idx, cin, cout in _VGG16_CONVS:  # torchvision layout, plus a classifier key to ignore
        vgg[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{idx}.bias"] = torch.zeros(cout)
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(vgg, tmp_path / "vgg16.pth")
    widths = (64, 128, 256, 512, 512)
    torch.save(
        {f"lin{i}.model.1.weight": torch.full((1, c, 1, 1), 2.0) for i, c in enumerate(widths)},
        tmp_path / "lin.pth",
    )
    plain = LPIPS(str(tmp_path / "vgg16.pth"))
    weighted = LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "lin.pth"))
    a = torch.rand(2, 1, 16, 16) * 2 - 1  # grayscale is repeated to 3 channels
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1).requires_grad_(True)
    assert float(plain(a, a)) == 0.0
    d = plain(b, a)
    assert float(d.detach()) > 0
    torch.testing.assert_close(weighted(b, a), 2 * d)  # the linear heads weight each channel
    d.backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    # Through the tokenizer: the loss logs it and nothing of VGG lands in the state dict.
    model = MultiScaleVQVAE(
        tiny_cfg(image_channels=1, perceptual_weight=1.0, perceptual_vgg=str(tmp_path / "vgg16.pth"))
    )
    out = model.loss({"image": a})
    assert "perceptual" in out and float(out["perceptual"]) > 0
    assert set(model.state_dict()) == set(MultiScaleVQVAE(tiny_cfg(image_channels=1)).state_dict())
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        LPIPS(str(tmp_path / "missing.pth"))


def test_trains_and_resumes_through_the_trainer(tmp_path):
    from maskar.checkpoint import latest_checkpoint, load_model, load_trainer_state
    from maskar.config import Config, to_dict
    from maskar.train.trainer import train

    model_cfg = to_dict(
        tiny_cfg(image_channels=1, disc_weight=0.1, disc_ch=8, disc_layers=1, dead_code_steps=2)
    )
    data = {"name": "digits", "resolution": 16, "channels": 1, "limit": 16}
    opts = {
        "steps": 3,
        "batch_size": 8,
        "out_dir": str(tmp_path / "run"),
        "ckpt_every": 0,
        "log_every": 1,
        "progress": False,
        "tensorboard": False,
        "lr": 1e-3,
    }
    cfg = build(Config, {"model": model_cfg, "data": data, "train": opts, "device": "cpu"})
    train(cfg, stop_at=2)  # interrupted after 2 steps, with a checkpoint
    assert load_trainer_state(latest_checkpoint(tmp_path / "run"))["disc_optimizer"] is not None
    train(cfg)  # resumes and finishes step 3
    model, _ = load_model(tmp_path / "run")
    assert isinstance(model, MultiScaleVQVAE)
    # The official hit-count buffer is trained state: saved and restored with the weights.
    assert model.quantize.ema_vocab_hit_SV.sum() > 0
    assert load_trainer_state(latest_checkpoint(tmp_path / "run"))["step"] == 3
    assert "usage_s0" in (tmp_path / "run" / "log.txt").read_text()


def test_resolution_is_derived_from_patch_nums_unless_set():
    from maskar.config import build, load_config

    cfg = build(VQVAEConfig, {"patch_nums": [1, 2, 4, 8]})
    assert cfg.resolution == 8 * cfg.downsample == 128
    with pytest.raises(ValueError, match="resolution=256"):
        build(VQVAEConfig, {"patch_nums": [1, 2, 4, 8], "resolution": 256})
    pn512 = "[1,2,3,4,6,9,13,18,24,32]"
    assert load_config("vqvae-256", [f"model.patch_nums={pn512}"]).model.resolution == 512
    assert load_config("var-d16", [f"model.tokenizer.patch_nums={pn512}"]).model.tokenizer.resolution == 512


def test_convert_cli_patch_nums_override(tmp_path, tiny):
    import yaml

    from maskar.checkpoint import load_model
    from maskar.config import to_dict
    from maskar.convert import vqvae as convert_vqvae

    torch.save(convert_vqvae.export_official(tiny), tmp_path / "vae.pth")
    data = to_dict(tiny.cfg)
    data["resolution"] = None
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"model": data}))
    argv = [f"src={tmp_path / 'vae.pth'}", f"out={tmp_path / 'o'}", f"preset={tmp_path / 'p.yaml'}"]
    assert convert_vqvae.cli([*argv, "model.patch_nums=[1,2,8]"]) == 0
    back, cfg = load_model(tmp_path / "o", device="cpu")
    assert back.patch_nums == (1, 2, 8) and cfg.model.resolution == tiny.cfg.resolution
    for k, v in tiny.state_dict().items():
        if "ema_vocab_hit" not in k:  # per-scale statistics: zeroed for another schedule
            assert torch.equal(back.state_dict()[k], v), k


def test_channels_last_bf16_decode_runs_the_output_conv_in_nchw(tiny, monkeypatch):
    """With the bf16 decoder in channels-last memory, the 3-channel output conv still gets an NCHW
    input (cuDNN's channels-last kernel for it was 6x slower on the H200), and the images equal the
    NCHW decode's to bf16 rounding."""
    import maskar.tokenizers.vqvae as vq

    seen = []
    hook = tiny.decoder.conv_out.register_forward_pre_hook(
        lambda mod, args: seen.append((args[0].is_contiguous(), args[0].dtype))
    )
    g = torch.Generator().manual_seed(0)
    fhat = torch.randn(2, tiny.z_channels, tiny.latent_side, tiny.latent_side, generator=g)
    try:
        with torch.no_grad():
            exact = tiny.fhat_to_img(fhat, "fp32")
            ref = tiny.fhat_to_img(fhat, "bf16")
            monkeypatch.setattr(vq, "BF16_CHANNELS_LAST", True)
            got = tiny.fhat_to_img(fhat, "bf16")
    finally:
        hook.remove()
    assert seen[1:] == [(True, torch.bfloat16)] * 2

    def err(x):
        return float((x - exact).norm() / exact.norm())

    assert err(got) < 1.5 * err(ref) + 1e-3, (err(got), err(ref))  # bf16 rounding, in another order


def test_decode_channels_last_switch_is_read_at_import():
    """MASKAR_DECODE_CHANNELS_LAST (read at import): the channels-last bf16 decode, on unless 0."""
    from helpers_env import last_line_with

    code = "import maskar.tokenizers.vqvae as v; print(v.BF16_CHANNELS_LAST)"
    for value, want in (("1", "True"), (None, "True"), ("0", "False")):
        assert last_line_with("MASKAR_DECODE_CHANNELS_LAST", value, code) == want


def _peak_live_bytes(fn) -> tuple[torch.Tensor, int]:
    """(fn()'s output, the most bytes of tensors created inside fn alive at once), by the allocation
    trace of scripts/graph_pool_model.py (without its autocast emulation)."""
    from helpers_scripts import load_script

    model = load_script("graph_pool_model")
    tracer = model._Tracer()
    tracer.autocast = [False]
    with tracer:
        out = fn()
    return out, model.replay(tracer.events)["peak"]


def test_decoder_frees_each_activation_as_soon_as_the_next_exists():
    """In inference the decoder holds a block's input and the tensors its next step needs, not
    the level's input for the whole level (``h = level(h)``) nor conv1's output during conv2:
    at the top level's peak one full-size tensor fewer here (5 -> 4: the CPU's GroupNorm + SiLU
    makes two outputs; with the fused op's one, two fewer), the same bits out."""
    from maskar.tokenizers.common import Decoder, ResnetBlock, norm_act

    torch.manual_seed(0)
    dec = Decoder(ch=8, ch_mult=(1, 1), num_res_blocks=2, in_channels=4, out_channels=3, mid_attn=False,
                  norm_groups=4).eval()  # fmt: skip
    z = torch.randn(2, 4, 8, 8)

    def earlier_block(blk, x):  # ResnetBlock.forward before 2026-12-05
        h = blk.conv1(norm_act(blk.norm1, x))
        h = blk.conv2(blk.dropout(norm_act(blk.norm2, h)))
        return blk.nin_shortcut(x) + h

    def earlier():  # Decoder.forward before 2026-12-05
        h = dec.mid(dec.conv_in(z))
        for level in reversed(dec.up):
            def run(x, level=level):
                for step in level.steps():
                    x = earlier_block(step, x) if isinstance(step, ResnetBlock) else step(x)
                return x
            h = run(h)
        return dec.conv_out(norm_act(dec.norm_out, h))

    with torch.no_grad():
        want, before = _peak_live_bytes(earlier)
        got, after = _peak_live_bytes(lambda: dec(z))
    assert torch.equal(got, want)
    top = 2 * 8 * 16 * 16 * 4  # one float32 (B 2, 8 channels, 16 x 16) activation
    assert after <= before - top, (before, after, top)
