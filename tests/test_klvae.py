"""KL-16 autoencoder: official layout, latent scaling, training loss."""

from __future__ import annotations

import json

import pytest
import torch
from reference_tables import REFERENCE

from maskar.config import ConfigError, build
from maskar.convert import klvae as convert_klvae
from maskar.tokenizers.klvae import KLVAE, KLVAEConfig


def tiny_cfg(**kw) -> KLVAEConfig:
    base = dict(
        resolution=16,
        ch=8,
        ch_mult=(1, 2, 2),
        enc_res_blocks=1,
        dec_res_blocks=1,
        norm_groups=4,
        z_channels=4,
        embed_dim=4,
    )
    base.update(kw)
    return build(KLVAEConfig, base, "model")


def test_official_shapes_load_strictly_and_round_trip(tmp_path):
    path = REFERENCE / "kl16_vae_state_dict_shapes.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    shapes = json.loads(path.read_text())
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v, generator=g) for k, v in shapes.items()}
    model = convert_klvae.load_official({"model": sd})
    assert sum(p.numel() for p in model.parameters()) == 66_456_019
    # The decoder has attention only in its middle block; the encoder at the lowest level too.
    assert not any(".attn." in k for k in sd if k.startswith("decoder.up"))
    out = convert_klvae.export_official(model)
    assert set(out) == set(sd)
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_file_round_trip_drops_training_keys(tmp_path):
    torch.manual_seed(0)
    model = KLVAE(tiny_cfg(disc_weight=0.1, disc_ch=8, disc_layers=1))
    path = tmp_path / "kl.ckpt"
    convert_klvae.save_official(model, path)
    sd = torch.load(path, weights_only=True)["model"]
    assert not any(k.startswith("train_losses") for k in sd)
    sd["loss.discriminator.main.0.weight"] = torch.zeros(1)  # LDM training leftovers are dropped
    torch.save({"model": sd}, path)
    back = convert_klvae.load_official(path, tiny_cfg())
    assert torch.equal(back.encoder.conv_in.weight, model.encoder.conv_in.weight)
    sd.pop("post_quant_conv.bias")
    with pytest.raises(ConfigError, match="post_quant_conv.bias"):
        convert_klvae.load_official(sd, tiny_cfg())


def test_convert_cli_takes_a_preset_and_overrides(tmp_path):
    import yaml

    from maskar.checkpoint import load_model
    from maskar.config import to_dict

    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = KLVAE(cfg)
    convert_klvae.save_official(model, tmp_path / "kl.ckpt")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"model": to_dict(tiny_cfg(embed_dim=2, z_channels=2))}))
    argv = [f"src={tmp_path / 'kl.ckpt'}", f"out={tmp_path / 'o'}", f"preset={tmp_path / 'p.yaml'}"]
    with pytest.raises(Exception, match="shape mismatch"):  # the preset's sizes do not fit the file
        convert_klvae.cli(argv)
    fit = ["model.embed_dim=4", "model.z_channels=4", "model.scale_factor=0.5"]
    assert convert_klvae.cli([*argv, *fit]) == 0
    back, saved = load_model(tmp_path / "o", device="cpu")
    assert saved.model.scale_factor == 0.5 and saved.model.embed_dim == 4
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_latent_scaling_and_shapes():
    torch.manual_seed(0)
    m = KLVAE(tiny_cfg(scale_factor=0.5)).eval()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        moments = m.encode_moments(img)
        assert moments.shape == (2, 8, 4, 4) and m.downsample == 4
        mean, logvar = moments.chunk(2, 1)
        torch.testing.assert_close(m.encode_mean(img), mean * 0.5)
        # sample = (mean + std * eps) * scale with the generator's eps and logvar clamped.
        moments = torch.cat([mean, torch.full_like(logvar, 50.0)], 1)
        z = m.sample_latent(moments, torch.Generator().manual_seed(3))
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(z, (mean + torch.exp(torch.tensor(10.0)) * eps) * 0.5)
        # decode divides by the scale: decode(scale * z) == decoder(post_quant_conv(z)), clamped.
        zu = torch.randn(2, 4, 4, 4)
        torch.testing.assert_close(m.decode(zu * 0.5), m.decode_unscaled(zu).clamp(-1, 1))
        assert m.decode(zu).abs().max() <= 1.0


def test_config_validation():
    with pytest.raises(ConfigError, match="multiple of the downsample"):
        tiny_cfg(resolution=18)
    with pytest.raises(ConfigError, match="perceptual_vgg"):
        tiny_cfg(perceptual_weight=1.0)


def test_tiny_kl_loss_falls():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x = torch.tensor(load_digits().images[:16], dtype=torch.float32) / 16 * 2 - 1
    img = torch.nn.functional.interpolate(x[:, None], size=(16, 16), mode="bilinear").expand(-1, 3, -1, -1)
    model = KLVAE(tiny_cfg(kl_weight=1e-3))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(10):
        out = model.loss({"image": img})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.on_train_step_end(step)
        losses.append(out["loss"].item())
    assert {"l1", "l2", "kl", "psnr"} <= set(out)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses


def test_tokenizer_quality_bench_reports_latent_scale(tmp_path):
    from maskar.bench import tokenizer_quality
    from maskar.checkpoint import save_model
    from maskar.config import Config, to_dict

    cfg = tiny_cfg(image_channels=1)
    full = build(Config, {"model": to_dict(cfg), "data": {"name": "digits", "resolution": 16, "channels": 1}})
    save_model(tmp_path / "tok", KLVAE(cfg), full)
    assert (
        tokenizer_quality.main([str(tmp_path / "tok"), "limit=8", "device=cpu", f"json={tmp_path}/r.json"])
        == 0
    )
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["images"] == 8 and res["suggested_scale_factor"] == pytest.approx(1 / res["latent_std"])
