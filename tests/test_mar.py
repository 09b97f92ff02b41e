"""MAR: official layout, training on one batch, sampling schedule, CFG/temperature, editing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_masked import TINY_FIELDS, StandInKL, assert_strict_meta_load, official_file
from reference_tables import REFERENCE
from scipy.stats import truncnorm

from maskar.models.mar import MAR, MARConfig, mask_from_order, truncated_normal_ratio
from maskar.nn.sampling import SamplingTrace


def tiny_cfg(**kw) -> MARConfig:
    base = dict(TINY_FIELDS)
    base.update(kw)
    return MARConfig(**base)


def tiny_mar(**kw) -> MAR:
    torch.manual_seed(0)
    return MAR(tiny_cfg(**kw), tokenizer=StandInKL())


def randomize_head(model: MAR) -> None:
    # The head starts with a zero output layer (eps = 0); give it weights so CFG matters.
    g = torch.Generator().manual_seed(1)
    for p in model.diffloss.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ----------------------------------------------------------------------------- official layout


@pytest.mark.skipif(
    not (REFERENCE / "mar_base_state_dict_shapes.json").exists(), reason="no reference tables"
)
def test_mar_base_matches_official_state_dict_and_loads_strictly():
    shapes = json.loads((REFERENCE / "mar_base_state_dict_shapes.json").read_text())
    with torch.device("meta"):
        model = MAR(MARConfig(), tokenizer=StandInKL(16, 16))
    own = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("tokenizer.")}
    assert own == shapes
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tokenizer."))
    assert n_params == 207_924_768
    assert_strict_meta_load(model, shapes)


def test_vit_block_names_and_dropout():
    model = tiny_mar()
    keys = {k for k in model.state_dict() if k.startswith("encoder_blocks.0.")}
    assert keys == {
        f"encoder_blocks.0.{n}.{p}"
        for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    }
    blk = model.encoder_blocks[0]
    assert blk.attn.attn_drop == 0.1 and blk.mlp.drop1.p == 0.1 and blk.attn.proj_drop.p == 0.1
    assert blk.attn.attn_backend == "auto" and blk.norm1.eps == 1e-6
    assert model.no_weight_decay_keywords() == {"diffloss"}
    assert not any(p.requires_grad for p in model.tokenizer.parameters())


def test_patchify_roundtrip_and_order():
    model = tiny_mar(patch_size=2, img_size=32)  # latent 4x4 -> 2x2 tokens of 4*2*2 channels
    lat = torch.randn(2, 4, 4, 4)
    tok = model.patchify(lat)
    assert tok.shape == (2, 4, 16)
    torch.testing.assert_close(model.unpatchify(tok), lat)
    # token 1 = latent rows 0..1, cols 2..3; features ordered (c, p, q)
    torch.testing.assert_close(tok[0, 1], lat[0, :, 0:2, 2:4].reshape(-1))


# ----------------------------------------------------------------------------- masking


def test_truncated_normal_mask_ratio():
    r = truncated_normal_ratio(20000, 0.7, 0.25, torch.Generator().manual_seed(0))
    assert r.min() >= 0.7 and r.max() <= 1.0
    ref = truncnorm((0.7 - 1) / 0.25, 0, loc=1, scale=0.25)
    assert r.mean().item() == pytest.approx(ref.mean(), abs=3e-3)
    assert r.std().item() == pytest.approx(ref.std(), abs=3e-3)


def test_training_masks_ceil_of_ratio_and_drops_labels(monkeypatch):
    model = tiny_mar(label_drop_prob=1.0)
    model.train()
    seen = {}
    real = model.forward_encoder

    def spy(tokens, mask, class_emb, num_masked):
        seen["mask"], seen["num"] = mask, num_masked
        x, keep = real(tokens, mask, class_emb, num_masked)
        seen["visible"] = x.shape[1]
        return x, keep

    monkeypatch.setattr(model, "forward_encoder", spy)
    out = model.loss({"image": torch.randn(3, 3, 32, 32), "label": torch.tensor([0, 1, 2])})
    n = model.seq_len
    assert (seen["mask"].sum(1) == seen["num"]).all()
    assert math.ceil(0.7 * n) <= seen["num"] <= n
    assert seen["visible"] == model.buffer_size + n - seen["num"]
    assert out["mask_ratio"].item() == pytest.approx(seen["num"] / n)
    # label drop: with p = 1 the buffer holds fake_latent, so labels do not matter
    torch.manual_seed(5)
    a = model.forward_train(torch.randn(2, 4, 4, 4), torch.tensor([0, 1]))["loss"]
    torch.manual_seed(5)
    b = model.forward_train(torch.randn(2, 4, 4, 4), torch.tensor([7, 3]))["loss"]
    assert torch.equal(a, b)


def test_cached_moments_pick_flip_per_sample():
    model = tiny_mar()
    b = 64
    mom = torch.cat([torch.full((b, 4, 4, 4), 1.0), torch.full((b, 4, 4, 4), -30.0)], dim=1)
    flip = torch.cat([torch.full((b, 4, 4, 4), 2.0), torch.full((b, 4, 4, 4), -30.0)], dim=1)
    lat = model.latents_from_batch(
        {"moments": mom, "moments_flip": flip, "label": torch.zeros(b, dtype=torch.long)}
    )
    per_sample = lat.flatten(1).mean(1) / 0.2325
    assert torch.allclose(per_sample[per_sample < 1.5], torch.tensor(1.0), atol=1e-4)
    assert ((per_sample - 1).abs() < 1e-4).any() and ((per_sample - 2).abs() < 1e-4).any()
    out = model.loss({"moments": mom, "label": torch.zeros(b, dtype=torch.long)})
    assert torch.isfinite(out["loss"])


def test_tiny_mar_overfits_one_batch():
    torch.manual_seed(0)
    model = MAR(tiny_cfg(diffusion_batch_mul=8, diffloss_w=64, label_drop_prob=0.0), tokenizer=StandInKL())
    latent = torch.randn(4, 4, 4, 4) * 0.5
    labels = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(60):
        loss = model.forward_train(latent, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


# ----------------------------------------------------------------------------- sampling


def expected_reveals(n_unknown: int, num_iter: int) -> list[int]:
    """Closed form of the MAR schedule: after step s, floor(n cos(pi/2 (s+1)/T)) stay masked."""
    masked, out = n_unknown, []
    for s in range(num_iter):
        target = math.floor(n_unknown * math.cos(math.pi / 2 * (s + 1) / num_iter))
        nxt = 0 if s == num_iter - 1 else max(1, min(masked - 1, target))
        out.append(masked - nxt)
        masked = nxt
    return out


@pytest.mark.parametrize("num_iter", [1, 4, 7, 40])
def test_reveals_follow_cosine_schedule(num_iter):
    model = tiny_mar()
    steps = SamplingTrace()
    tokens = model.sample_tokens(
        torch.tensor([1, 2]), num_iter=num_iter, trace=steps, generator=torch.Generator().manual_seed(0)
    )
    trace = [int(s.mask[0].sum()) for s in steps]
    assert all((s.mask.sum(1) == s.mask[0].sum()).all() for s in steps)
    assert trace == expected_reveals(16, num_iter)
    assert sum(trace) == 16
    if num_iter == 4:
        assert trace == [2, 3, 5, 6]  # 16 cos(pi/8)=14.8, 16 cos(pi/4)=11.3, 16 cos(3pi/8)=6.1
    assert (tokens.abs().sum(-1) > 0).all()  # every token was written


def test_generate_seeded_cfg_and_temperature(monkeypatch):
    model = tiny_mar()
    randomize_head(model)
    labels = torch.tensor([3, 10])  # 10 == class_num: unconditional
    a = model.generate(labels, seed=1, num_iter=4, num_sampling_steps="4", cfg=3.0)
    b = model.generate(labels, seed=1, num_iter=4, num_sampling_steps="4", cfg=3.0)
    c = model.generate(labels, seed=2, num_iter=4, num_sampling_steps="4", cfg=3.0)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, model.generate(labels, seed=1, num_iter=4, num_sampling_steps="4", cfg=1.0))
    assert not torch.equal(
        a, model.generate(labels, seed=1, num_iter=4, num_sampling_steps="4", cfg=3.0, temperature=0.5)
    )

    calls = []
    real_sample = model.diffloss.sample

    def spy(z, temperature, cfg, **kw):
        calls.append((z.shape[0], temperature, cfg))
        return real_sample(z, temperature, cfg, **kw)

    monkeypatch.setattr(model.diffloss, "sample", spy)
    real_enc = model.forward_encoder
    embs = []
    monkeypatch.setattr(
        model, "forward_encoder", lambda t, m, e, n: (embs.append(e), real_enc(t, m, e, n))[1]
    )
    model.sample_tokens(torch.tensor([3, 4]), num_iter=4, cfg=3.0, cfg_schedule="linear", temperature=0.7)
    reveals = expected_reveals(16, 4)
    masked_after = [16 - sum(reveals[: i + 1]) for i in range(4)]
    masked_after[-1] = 1  # the last step still uses the clamped mask_len in the cfg schedule
    assert [c[2] for c in calls] == pytest.approx([1 + 2.0 * (16 - m) / 16 for m in masked_after])
    assert [c[0] for c in calls] == [2 * 2 * r for r in reveals]  # cond + uncond rows
    assert all(c[1] == 0.7 for c in calls)
    torch.testing.assert_close(embs[0][2:], model.fake_latent.expand(2, -1))  # uncond half
    torch.testing.assert_close(embs[0][:2], model.class_emb.weight[[3, 4]])
    calls.clear()
    model.sample_tokens(torch.tensor([3, 4]), num_iter=4, cfg=3.0, cfg_schedule="constant")
    assert [c[2] for c in calls] == [3.0] * 4
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.sample_tokens(torch.tensor([3]), cfg_schedule="cosine")


def test_edit_keeps_known_tokens():
    model = tiny_mar()
    randomize_head(model)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    keep = torch.zeros(3, 1, 32, 32, dtype=torch.bool)
    keep[0, :, :16, :] = True  # top half: 8 known tokens
    keep[1, :, :, :20] = True  # columns 0..19: tokens in latent columns 0,1 fully kept (8 known)
    keep[2, :, :8, :8] = True  # one token
    known = model.patchify(model.tokenizer.encode_mean(images))
    token_keep = model.token_keep_mask(keep)
    assert token_keep.sum(1).tolist() == [8, 8, 1]
    out = model.edit(
        images,
        keep,
        torch.tensor([1, 2, 10]),
        seed=0,
        num_iter=5,
        cfg=2.0,
        num_sampling_steps="3",
        return_tokens=True,
    )
    torch.testing.assert_close(out[token_keep], known[token_keep])
    assert (out[~token_keep] - known[~token_keep]).abs().amax() > 0
    img = model.edit(images, keep, torch.tensor([1, 2, 10]), seed=0, num_iter=2, num_sampling_steps="2")
    assert img.shape == images.shape
    # schedule over the unknown tokens only
    steps = SamplingTrace()
    model.sample_tokens(
        torch.tensor([1]), num_iter=3, known=known[:1], known_mask=token_keep[:1], trace=steps
    )
    assert [int(s.mask.sum()) for s in steps] == expected_reveals(8, 3)
    assert not any((s.mask & token_keep[:1]).any() for s in steps)  # known tokens are never drawn


def test_generate_trace_and_given_tokens():
    model = tiny_mar()
    randomize_head(model)
    labels = torch.tensor([1, 2, 10])
    kw = dict(seed=4, num_iter=3, cfg=2.0, num_sampling_steps="3")
    plain = model.generate(labels, **kw)
    images, trace = model.generate(labels, **kw, return_trace=True)
    assert torch.equal(images, plain) and [s.stage for s in trace] == ["mar"] * 3
    drawn = torch.zeros(3, model.seq_len, dtype=torch.bool)
    for s in trace:
        assert not (s.mask & drawn).any() and torch.equal(s.info["input_mask"], ~drawn)
        drawn |= s.mask
    assert drawn.all()
    assert trace.steps[-1].info["cfg"] == 1.0 + (2.0 - 1.0) * 15 / 16  # official: mask_len >= 1 at the end
    assert torch.equal(model.tokenizer.decode(model.unpatchify(trace.steps[-1].tokens)), images)
    # given tokens: generate(known=...) is edit() without the image encoding
    images_in = torch.rand(3, 3, 32, 32) * 2 - 1
    keep = torch.zeros(3, 1, 32, 32, dtype=torch.bool)
    keep[0, :, :16] = True
    keep[1, :, :, :8] = True
    known = model.patchify(model.tokenizer.encode_mean(images_in).float())
    known_mask = model.token_keep_mask(keep)
    edited = model.edit(images_in, keep, labels, return_tokens=True, **kw)
    got, trace = model.generate(labels, known=known, known_mask=known_mask, return_trace=True, **kw)
    assert torch.equal(got, model.tokenizer.decode(model.unpatchify(edited)))
    for s in trace:
        rows = s.info["rows"]
        assert not (s.mask & known_mask[rows]).any()  # known tokens are never drawn
    with pytest.raises(ValueError, match="known / known_mask"):
        model.generate(labels, known=known[:, :5], known_mask=known_mask)


def test_mask_from_order():
    orders = torch.tensor([[2, 0, 1, 3], [3, 2, 1, 0]])
    assert mask_from_order(orders, 2).tolist() == [[True, False, True, False], [False, False, True, True]]


# ----------------------------------------------------------------------------- official checkpoints


def _official_file(tmp_path, model, with_args: bool) -> Path:
    return official_file(tmp_path, model, with_args, run_name="mar_base", epoch=799)


def test_load_official_weights_only_and_trust_pickle(tmp_path):
    from maskar.checkpoint import CheckpointError
    from maskar.convert.mar import load_into, load_official

    model = tiny_mar()
    path = _official_file(tmp_path, model, with_args=True)
    with pytest.raises(CheckpointError, match="trust_pickle=true"):
        load_official(path)
    state = load_official(path, trust_pickle=True)  # model_ema by default
    assert not any(k.startswith("tokenizer.") for k in state)
    fresh = tiny_mar()
    load_into(fresh, state)
    torch.testing.assert_close(fresh.fake_latent, model.fake_latent + 1.0)
    torch.testing.assert_close(fresh.tokenizer.enc.weight, model.tokenizer.enc.weight)  # untouched
    raw = load_official(path, entry="model", trust_pickle=True)
    torch.testing.assert_close(raw["mask_token"], model.mask_token)
    # without args, plain weights_only loading works
    path2 = _official_file(tmp_path, model, with_args=False)
    assert set(load_official(path2)) == set(state)
    # a mis-shaped or missing key is one clear error
    bad = dict(state)
    bad["mask_token"] = torch.zeros(1, 2, 32)
    del bad["fake_latent"]
    with pytest.raises(CheckpointError, match="fake_latent.*|mask_token"):
        load_into(tiny_mar(), bad)


def test_convert_cli_writes_a_loadable_checkpoint(tmp_path):
    from maskar import checkpoint
    from maskar.config import load_config
    from maskar.convert import klvae as convert_klvae
    from maskar.convert import mar as convert_mar
    from maskar.registry import build_model

    cfg = load_config("mar-tiny")
    torch.manual_seed(3)
    model = build_model(cfg.model)
    src = _official_file(tmp_path, model, with_args=True)
    vae = tmp_path / "kl.ckpt"
    convert_klvae.save_official(model.tokenizer, vae)
    out = tmp_path / "converted"
    argv = [f"src={src}", f"vae={vae}", "preset=mar-tiny", f"out={out}", "trust_pickle=true"]
    assert convert_mar.cli(argv) == 0
    loaded, loaded_cfg = checkpoint.load_model(out, arch="mar")
    assert loaded_cfg.model.tokenizer_ckpt is None
    torch.testing.assert_close(loaded.fake_latent, model.fake_latent + 1.0)
    torch.testing.assert_close(loaded.tokenizer.state_dict(), model.tokenizer.state_dict())


def test_bench_runs_tiny_on_cpu(capsys):
    from maskar.bench.mar import main

    argv = [
        "--preset",
        "mar-tiny",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--train-batch",
        "2",
        "--num-iters",
        "2",
    ]
    assert main(argv + ["--sample-reps", "1", "--train-reps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "img/s" in out and "train step (cached latents)" in out


def test_tokenizer_ckpt_dir_and_latent_cache(tmp_path):
    import dataclasses

    from maskar import checkpoint
    from maskar.config import Config, build, load_config, to_dict
    from maskar.data.latent_store import LatentDataset
    from maskar.models.mar import build_tokenizer, cache_latents_for
    from maskar.registry import build_model

    cfg = load_config("mar-tiny")
    tok_cfg = cfg.model.tokenizer
    torch.manual_seed(0)
    tok = build_model(tok_cfg)
    tok_dir = tmp_path / "tok"
    checkpoint.save_model(tok_dir, tok, build(Config, {"model": to_dict(tok_cfg)}))
    mcfg = dataclasses.replace(cfg.model, tokenizer_ckpt=str(tok_dir))
    model = MAR(mcfg)
    model.init_pretrained()
    torch.testing.assert_close(model.tokenizer.state_dict(), tok.state_dict())
    bad = dataclasses.replace(mcfg, tokenizer=dataclasses.replace(tok_cfg, scale_factor=0.5))
    with pytest.raises(ValueError, match="scale_factor"):
        build_tokenizer(bad)

    class Images(torch.utils.data.Dataset):
        num_classes = 10

        def __len__(self):
            return 5

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"image": torch.rand(3, 32, 32, generator=g) * 2 - 1, "label": torch.tensor(i % 10)}

    cache_latents_for(mcfg, Images(), str(tmp_path / "lat"), batch_size=2)
    ds = LatentDataset(tmp_path / "lat")
    item = ds[3]
    img = Images()[3]["image"][None]
    with torch.no_grad():
        torch.testing.assert_close(item["moments"][None], tok.encode_moments(img), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            item["moments_flip"][None], tok.encode_moments(img.flip(-1)), rtol=1e-4, atol=1e-5
        )
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert torch.isfinite(model.loss(batch)["loss"])


def test_cli_train_sample_edit_tiny(tmp_path):
    from PIL import Image

    from maskar.cli import main

    run = tmp_path / "run"
    common = ["train.progress=false", "train.tensorboard=false"]
    assert main(["train", "preset=mar-tiny", "train.steps=2", f"train.out_dir={run}", *common]) == 0
    grid = tmp_path / "s.png"
    assert (
        main(["sample", f"ckpt={run}", "labels=0,1", "per_class=1", f"out={grid}", "sample.num_iter=2"]) == 0
    )
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    edited = tmp_path / "e.png"
    argv = ["edit", f"ckpt={run}", f"image={tmp_path / 'in.png'}", "mask=box:0.25,0.25,0.75,0.75", "n=1"]
    assert main(argv + [f"out={edited}", "sample.num_iter=2"]) == 0
    assert grid.is_file() and edited.is_file()


def test_presets_and_sampling_config_validation():
    from maskar.config import ConfigError, load_config

    for name, width, cfg_scale in (("mar-b", 768, 2.9), ("mar-l", 1024, 3.0), ("mar-h", 1280, 3.2)):
        c = load_config(name)
        assert c.model.encoder_embed_dim == width and c.sample.cfg == cfg_scale
        assert c.model.tokenizer.scale_factor == 0.2325 and c.train.weight_decay == 0.02
    assert load_config("mar-tiny", ["sample.num_sampling_steps=50"]).sample.num_sampling_steps == 50
    with pytest.raises(ConfigError, match="num_sampling_steps"):
        load_config("mar-tiny", ["sample.num_sampling_steps=abc"])
    with pytest.raises(ConfigError, match="cfg_schedule"):
        load_config("mar-tiny", ["sample.cfg_schedule=cosine"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config("mar-tiny", ["model.encoder_num_heads=3"])


@pytest.mark.parametrize(
    ("preset", "total", "head"), [("mar-l", 478_326_304, 72_230_432), ("mar-h", 942_403_104, 151_206_944)]
)
def test_large_presets_match_official_parameter_counts(preset, total, head):
    from maskar.config import load_config

    with torch.device("meta"):
        model = MAR(load_config(preset).model, tokenizer=StandInKL(16, 16))
    named = list(model.named_parameters())
    assert sum(p.numel() for n, p in named if not n.startswith("tokenizer.")) == total
    assert sum(p.numel() for n, p in named if n.startswith("diffloss.")) == head
