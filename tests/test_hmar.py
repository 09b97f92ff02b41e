"""HMAR: loss weights, Markovian inference == block-diagonal training, refinement, converters."""

from __future__ import annotations

import pytest
import torch
from helpers_nextscale import REF, meta_official, random_indices, randomize

from maskar.config import ConfigError, build, load_config
from maskar.convert import hmar as convert_hmar
from maskar.models.hmar import (
    HMAR,
    HMARConfig,
    HMARSampleConfig,
    default_mask_schedule,
    validate_mask_schedule,
)
from maskar.models.var import scale_loss_weights
from maskar.tokenizers.vqvae import PATCH_NUMS

TINY_TOKENIZER = dict(
    arch="vqvae", resolution=16, ch=16, ch_mult=[1, 2, 2], norm_groups=8, z_channels=8, vocab_size=64,
    patch_nums=[1, 2, 3, 4], enc_res_blocks=1, dec_res_blocks=1, mid_attn=False,
    enc_attn_levels=[], dec_attn_levels=[],
)  # fmt: skip


def tiny_hmar(stage: int = 1, **kw) -> HMAR:
    torch.manual_seed(0)
    cfg = build(HMARConfig, dict(tokenizer=TINY_TOKENIZER, depth=3, width=32, heads=2, stage=stage,
                                 n_layers_train=2, **kw))  # fmt: skip
    return HMAR(cfg).eval()


# ----------------------------------------------------------------------------- loss weights


def test_lognorm_weights_match_reference_tables():
    want256 = [0.0247, 0.0642, 0.1150, 0.1379, 0.1402, 0.1329, 0.1208, 0.1054, 0.0882, 0.0709]
    want512 = [0.0196, 0.0667, 0.1141, 0.1389, 0.1379, 0.1246, 0.1112, 0.1037, 0.0958, 0.0876]
    got256 = scale_loss_weights(PATCH_NUMS[256], "lognorm")
    got512 = scale_loss_weights(PATCH_NUMS[512], "lognorm")
    torch.testing.assert_close(got256, torch.tensor(want256, dtype=torch.float64), atol=6e-5, rtol=0)
    torch.testing.assert_close(got512, torch.tensor(want512, dtype=torch.float64), atol=6e-5, rtol=0)
    uniform = scale_loss_weights(PATCH_NUMS[256], "uniform")
    assert abs(uniform[0].item() - 1 / 680) < 1e-9 and abs(uniform[-1].item() - 256 / 680) < 1e-9
    linear = scale_loss_weights((1, 2, 4), "linear")
    assert torch.allclose(linear, torch.tensor([1, 2, 3.0], dtype=torch.float64) / 6)


def test_model_token_weights_sum_to_scale_mass():
    m = tiny_hmar()
    mass = scale_loss_weights(m.patch_nums, "lognorm").float()
    got = torch.stack([m.loss_weight[b:e].sum() for b, e in m.begin_ends])
    torch.testing.assert_close(got, mass)


# ----------------------------------------------------------------------------- inference == training


def test_markov_inference_equals_block_diagonal_forward():
    m = tiny_hmar(cond_drop_rate=0.0)
    randomize(m)
    B = 3
    labels = torch.tensor([0, 7, m.num_classes])
    gt = random_indices(m, B)
    with torch.no_grad():
        want = m(labels, m.tokenizer.teacher_forcing_input(gt))
    keep = [torch.ones(B, pn * pn, dtype=torch.bool) for pn in m.patch_nums]
    _, trace = m.generate(labels, cfg=0.0, known=gt, keep=keep, return_trace=True, trace_logits=True)
    got = [s.logits for s in trace.select("next_scale")]
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-4, rtol=1e-4)
    # Markovian: new scale-2 tokens change only the input of scale 3; scales 0-2 keep their logits
    with torch.no_grad():
        gt2 = [g.clone() for g in gt]
        gt2[2] = (gt2[2] + 1) % m.vocab_size  # scale 2 only feeds scale 3's input
        other = m(labels, m.tokenizer.teacher_forcing_input(gt2))
    b, e = m.begin_ends[2]
    torch.testing.assert_close(other[:, :e], want[:, :e])


def test_refinement_inference_equals_teacher_forced_mask_forward():
    m = tiny_hmar(stage=2, cond_drop_rate=0.0)
    randomize(m)
    B, si = 2, 3
    labels = torch.tensor([1, 2])
    gt = random_indices(m, B, seed=4)
    masked_full = m.sample_train_mask(B, torch.device("cpu")).expand(B, -1)
    with torch.no_grad():
        x_ctx = m.tokenizer.teacher_forcing_input(gt)
        x_own = m.tokenizer.own_residual_input(gt)
        want = m.mask_forward(labels, x_ctx, x_own, masked_full)
    b, e = m.begin_ends[si]
    f_hat = m.tokenizer.indices_to_fhats(gt)[si - 1]  # the scales before si
    got = m.refinement_logits(labels, si, f_hat, gt[si], masked_full[:, b - 1 : e - 1])
    torch.testing.assert_close(got, want[:, b:e], atol=1e-4, rtol=1e-4)


def test_trace_and_public_refinement_pass_reproduce_generate():
    m = tiny_hmar(stage=2)
    randomize(m)
    labels = torch.tensor([0, 5, m.num_classes])
    schedule = [[1], [1, 3], [1, 1, 2, 5], [10, 6]]
    kw = dict(cfg=1.7, top_k=8, top_p=0.9, seed=3, mask_schedule=schedule, refine_cfg_schedule="official")
    plain = m.generate(labels, **kw)
    images, trace = m.generate(labels, **kw, return_trace=True, trace_logits=True)
    assert torch.equal(images, plain)
    stages = [(s.stage, s.index) for s in trace]
    assert stages == [("next_scale", 0), ("next_scale", 1), ("refine", 1), ("next_scale", 2)] + [
        ("refine", 2)
    ] * 3 + [("next_scale", 3), ("refine", 3)]
    prev_fhat = {si: trace.select("next_scale", si - 1)[0].info["f_hat"] for si in (1, 2, 3)}
    for si in (1, 2, 3):
        steps = trace.select(index=si)
        assert torch.equal(steps[0].info["final_tokens"], steps[-1].tokens)
        for before, step in zip(steps, steps[1:]):
            assert (
                step.info["cfg"] == 1.7 * 1e-6
                and step.mask.sum(1).tolist() == [step.info["order"].shape[1]] * 3
            )
            got = m.refinement_logits(
                labels, si, prev_fhat[si], before.tokens, step.mask, cfg=step.info["cfg"]
            )
            assert torch.equal(got, step.logits)  # the public pass is the loop's pass
            assert torch.equal(step.tokens[~step.mask], before.tokens[~step.mask])
    # ranking: the first refinement's positions are the official lowest-confidence choice
    from maskar.nn.sampling import lowest_confidence, token_confidence

    ns = trace.select("next_scale", 2)[0]
    conf = token_confidence(ns.logits, ns.tokens, top_k=8, top_p=0.9)
    first = trace.select("refine", 2)[0]
    assert torch.equal(first.info["order"], lowest_confidence(conf, 8))
    # refine_pass draws like the loop: same generator state -> same tokens
    g = torch.Generator().manual_seed(0)
    new, logits = m.refine_pass(labels, 2, prev_fhat[2], ns.tokens, first.mask, cfg=0.5, top_k=8, generator=g)
    from maskar.nn.sampling import sample_from_logits

    want = sample_from_logits(logits, 8, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(new, torch.where(first.mask, want, ns.tokens))
    with pytest.raises(ValueError, match="1x1"):
        m.refinement_logits(labels, 0, prev_fhat[1], ns.tokens[:, :1], first.mask[:, :1])
    with pytest.raises(ValueError, match="stage-1"):
        tiny_hmar(stage=1).refinement_logits(labels, 1, prev_fhat[1], ns.tokens[:, :4], first.mask[:, :4])


def test_refinement_follows_the_schedule(monkeypatch):
    m = tiny_hmar(stage=2)
    randomize(m)
    seen: list[tuple[int, list[int]]] = []
    real = m._mask_logits

    def spy(si, idx, masked, ctx):
        seen.append((si, masked.sum(1).tolist()))
        return real(si, idx, masked, ctx)

    monkeypatch.setattr(m, "_mask_logits", spy)
    schedule = [[1], [1, 3], [1, 1, 2, 5], [10, 6]]
    m.generate(torch.tensor([0, 1]), cfg=1.0, top_k=0, seed=0, mask_schedule=schedule)
    assert seen == [(1, [3, 3]), (2, [8, 8]), (2, [7, 7]), (2, [5, 5]), (3, [6, 6])]
    seen.clear()
    m.generate(torch.tensor([0]), refine=False, seed=0, mask_schedule=[[1], [1, 3], [9], [16]])
    assert seen == []
    out = m.generate(torch.tensor([0, 1]), refine_cfg=2.0, seed=3)
    assert out.shape == (2, 3, 16, 16)


def test_refine_on_stage1_is_a_clear_error():
    m = tiny_hmar(stage=1)
    with pytest.raises(ValueError, match="stage-2"):
        m.generate(torch.tensor([0]), refine=True)
    assert m.generate(torch.tensor([0]), seed=0).shape == (1, 3, 16, 16)  # default: no refinement


# ----------------------------------------------------------------------------- official refinement ranking
# Reference (shared/reference/hmar_var.md §4.4, §7 HMAR pitfall 6): the official sampler filters the
# guided logits in place with top-k / top-p, takes each drawn token's probability from the softmax of
# the *filtered* logits, and masks the lowest ones with an ascending argsort; later passes re-rank the
# still-masked tokens (in their current order) by the filtered mask-head softmax. top_k=1 makes every
# confidence 1.0, so the choice is pure position order.


def _spy_refinement(monkeypatch, m):
    """Record the next-scale draws (guided logits, ids), refinement draws and masked sets."""
    import maskar.models.hmar as hmar_mod
    import maskar.models.var as var_mod
    from maskar.nn.sampling import guided_logits

    rec = {"ns": [], "refine": [], "masked": []}
    real_ns, real_ref = var_mod.sample_from_logits, hmar_mod.sample_from_logits
    real_guided = var_mod.sample_guided

    def ns(logits, *a, **k):
        out = real_ns(logits, *a, **k)
        rec["ns"].append((logits.clone(), out.clone()))
        return out

    def ns_guided(logits2, batch, t, *a, **k):  # the scales whose draw makes the guidance itself
        out = real_guided(logits2, batch, t, *a, **k)
        rec["ns"].append((guided_logits(logits2.float(), batch, t), out.clone()))
        return out

    def ref(logits, *a, **k):
        out = real_ref(logits, *a, **k)
        rec["refine"].append((logits.clone(), out.clone()))
        return out

    monkeypatch.setattr(var_mod, "sample_from_logits", ns)
    monkeypatch.setattr(var_mod, "sample_guided", ns_guided)
    monkeypatch.setattr(hmar_mod, "sample_from_logits", ref)
    real_mask = m._mask_logits

    def spy(si, idx, masked, ctx):
        rec["masked"].append((si, masked.clone()))
        return real_mask(si, idx, masked, ctx)

    monkeypatch.setattr(m, "_mask_logits", spy)
    return rec


def _official_masked_sets(rec, schedule, top_k, top_p, filtered=True):
    """The masked sets the official rule picks, replayed from the recorded logits and draws."""
    from maskar.nn.sampling import filter_logits

    def conf(logits, idx):
        x = filter_logits(logits.float(), top_k, top_p) if filtered else logits.float()
        return x.softmax(-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)

    want, r = [], 0
    for si, entry in enumerate(schedule):
        if len(entry) == 1:
            continue
        logits, idx = rec["ns"][si]
        order = torch.sort(conf(logits, idx), dim=1, stable=True).indices[:, : sum(entry[1:])]
        for step in range(1, len(entry)):
            masked = torch.zeros_like(idx, dtype=torch.bool).scatter(1, order, True)
            want.append((si, masked))
            mlogits, new = rec["refine"][r]
            r += 1
            idx = torch.where(masked, new, idx)
            if step < len(entry) - 1:
                c = conf(mlogits, idx).gather(1, order)
                order = order.gather(
                    1, torch.sort(c, dim=1, stable=True).indices[:, : sum(entry[step + 1 :])]
                )
    return want


def test_greedy_refinement_re_predicts_positions_in_order(monkeypatch):
    m = tiny_hmar(stage=2)
    randomize(m)
    rec = _spy_refinement(monkeypatch, m)
    schedule = [[1], [1, 3], [1, 1, 2, 5], [10, 6]]
    m.generate(torch.tensor([0, 1, 5]), cfg=1.5, top_k=1, top_p=0.0, seed=0, mask_schedule=schedule)
    got = [(si, mk.nonzero()[:, 1].view(3, -1).tolist()) for si, mk in rec["masked"]]
    first = lambda n: [list(range(n))] * 3  # noqa: E731 - every sample: the first n positions
    assert got == [(1, first(3)), (2, first(8)), (2, first(7)), (2, first(5)), (3, first(6))]


@pytest.mark.parametrize("top_k, top_p", [(3, 0.0), (5, 0.9), (0, 0.6)])
def test_refinement_ranks_by_the_filtered_softmax(monkeypatch, top_k, top_p):
    m = tiny_hmar(stage=2)
    randomize(m)
    schedule = [[1], [1, 3], [1, 1, 2, 5], [10, 6]]
    differs = False
    for seed in range(4):
        rec = _spy_refinement(monkeypatch, m)
        labels = torch.tensor([0, 3, 7, m.num_classes])
        m.generate(labels, cfg=2.0, top_k=top_k, top_p=top_p, seed=seed, mask_schedule=schedule)
        want = _official_masked_sets(rec, schedule, top_k, top_p)
        assert [si for si, _ in rec["masked"]] == [si for si, _ in want]
        for (_, got), (_, exp) in zip(rec["masked"], want):
            assert torch.equal(got, exp)
        old = _official_masked_sets(rec, schedule, top_k, top_p, filtered=False)
        differs |= any(not torch.equal(a, b) for (_, a), (_, b) in zip(want, old))
        monkeypatch.undo()
    assert differs  # the case exercises a ranking the unfiltered rule gets wrong


def test_unfiltered_confidence_keeps_the_previous_rule(monkeypatch):
    m = tiny_hmar(stage=2)
    randomize(m)
    schedule = [[1], [1, 3], [1, 1, 2, 5], [10, 6]]
    rec = _spy_refinement(monkeypatch, m)
    m.generate(
        torch.tensor([0, 3, 7]), cfg=2.0, top_k=3, seed=1, mask_schedule=schedule, confidence="unfiltered"
    )
    want = _official_masked_sets(rec, schedule, 3, 0.0, filtered=False)
    for (_, got), (_, exp) in zip(rec["masked"], want, strict=True):
        assert torch.equal(got, exp)
    with pytest.raises(ValueError, match="confidence"):
        m.generate(torch.tensor([0]), confidence="softmax")
    assert load_config("hmar-tiny").sample.confidence == "official"


def test_official_refinement_guidance_is_cfg_times_1e_6(monkeypatch):
    import maskar.models.hmar as hmar_mod

    m = tiny_hmar(stage=2)
    randomize(m)
    seen = []
    real = hmar_mod.guided_logits
    monkeypatch.setattr(
        hmar_mod, "guided_logits", lambda lg, b, t: seen.append((lg.shape[0], b, t)) or real(lg, b, t)
    )
    schedule = [[1], [1, 3], [1, 1, 2, 5], [16]]
    m.generate(torch.tensor([0, 1]), cfg=1.7, seed=0, mask_schedule=schedule, refine_cfg_schedule="official")
    assert seen == [(4, 2, 1.7 * 1e-6)] * 4  # both CFG halves run, t = cfg * 1e-6 on every pass
    seen.clear()
    m.generate(torch.tensor([0, 1]), cfg=1.7, seed=0, mask_schedule=schedule, refine_cfg=0.5,
               refine_cfg_schedule="constant")  # fmt: skip
    assert seen == [(4, 2, 0.5)] * 4
    seen.clear()
    m.generate(torch.tensor([0, 1]), cfg=1.7, seed=0, mask_schedule=schedule, refine_cfg=0.6)
    assert seen == [(4, 2, 0.6 * 1 / 3)] + [(4, 2, 0.6 * 2 / 3)] * 3  # the cfg schedule (linear)


def test_lowest_confidence_is_a_stable_ascending_rank():
    from maskar.nn.sampling import lowest_confidence

    conf = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 0.2, 0.5, 0.1]])
    assert lowest_confidence(conf, 3).tolist() == [[0, 1, 2], [3, 1, 0]]
    among = torch.tensor([[3, 1, 2], [2, 0, 1]])  # ties keep the order of `among`
    assert lowest_confidence(conf, 2, among=among).tolist() == [[3, 1], [1, 2]]


# ----------------------------------------------------------------------------- schedules


def test_default_schedules_are_official():
    official = [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64], [100], [169], [256]]
    assert default_mask_schedule(PATCH_NUMS[256]) == official
    assert default_mask_schedule(PATCH_NUMS[512])[3] == [5, 11]
    assert default_mask_schedule((1, 2, 4)) == [[1], [1, 3], [16]]


@pytest.mark.parametrize(
    "schedule, message",
    [
        ([[1], [4]], "expected 4 lists"),
        ([[1], [1, 2], [9], [16]], r"sum to the scale's 2x2 = 4 tokens, got \[1, 2\] \(sum 3\)"),
        ([[1], [4], [0, 9], [16]], "positive integers"),
        ([[1], [4], [9.5], [16]], "positive integers"),
        ([[1], [], [9], [16]], "non-empty list"),
        ("[[1],[4]]", "expected 4 lists"),
    ],
)
def test_schedule_validation_errors(schedule, message):
    with pytest.raises(ValueError, match=message):
        validate_mask_schedule(schedule, (1, 2, 3, 4))


def test_schedule_error_reaches_generate_and_config():
    m = tiny_hmar(stage=2)
    with pytest.raises(ValueError, match="mask_schedule"):
        m.generate(torch.tensor([0]), mask_schedule=[[1], [2, 1], [9], [16]])
    with pytest.raises(ConfigError, match="mask_schedule"):
        load_config("hmar-tiny", ["sample.mask_schedule=[[1],[0,4],[9],[16]]"])
    cfg = load_config("hmar-tiny", ["sample.mask_schedule=[[1],[2,2],[9],[16]]"])
    assert isinstance(cfg.sample, HMARSampleConfig) and cfg.sample.mask_schedule[1] == [2, 2]


# ----------------------------------------------------------------------------- stage 2 training


def test_train_masks_shared_and_per_sample():
    m = tiny_hmar(stage=2)
    shared = m.sample_train_mask(4, torch.device("cpu"), ratio=0.3)
    assert shared.shape == (1, m.L - 1)
    counts = [shared[:, b - 1 : e - 1].sum().item() for b, e in m.begin_ends[1:]]
    assert counts == [2, 3, 5]  # ceil(0.3 * 4), ceil(0.3 * 9), ceil(0.3 * 16); scale 0 never masked
    assert all(m.sample_train_mask(1, torch.device("cpu")).sum() >= 3 for _ in range(20))
    m.cfg.mask_positions = "per_sample"
    per = m.sample_train_mask(64, torch.device("cpu"))
    assert per.shape == (64, m.L - 1) and not (per == per[:1]).all()
    assert (per.sum(1) == per[0].sum()).all()  # same count per sample, different positions


def test_stage2_trains_only_the_mask_branch_and_learns():
    m = tiny_hmar(stage=2, cond_drop_rate=0.0, drop_path_rate=0.0).train()
    names = [n for n, _ in m.named_trainable_parameters()]
    assert names and all(n.startswith(("mask_embed", "mask_blocks", "mask_head")) for n in names)
    batch = {"indices": torch.cat(random_indices(m, 4), dim=1), "label": torch.tensor([0, 1, 2, 3])}
    opt = torch.optim.AdamW([p for _, p in m.named_trainable_parameters()], lr=3e-3)
    torch.manual_seed(0)
    first = sum(m.loss(batch)["loss"].item() for _ in range(5)) / 5  # the mask ratio is random
    last = []
    for _ in range(60):
        out = m.loss(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        last = (last + [out["loss"].item()])[-5:]
    assert sum(last) / 5 < 0.5 * first, (first, last)
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("mask_"))


def test_stage1_overfits_one_batch():
    m = tiny_hmar(cond_drop_rate=0.0, drop_path_rate=0.0).train()
    batch = {"indices": torch.cat(random_indices(m, 4), dim=1), "label": torch.tensor([0, 1, 2, 3])}
    opt = torch.optim.AdamW([p for _, p in m.named_trainable_parameters()], lr=3e-3)
    first = m.loss(batch)["loss"].item()
    for _ in range(50):
        loss = m.loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first, (first, loss.item())


def test_stage2_initialises_from_stage1_checkpoint(tmp_path):
    from maskar.checkpoint import save_model
    from maskar.config import Config, to_dict

    s1 = tiny_hmar(stage=1)
    randomize(s1, seed=5)
    save_model(tmp_path / "s1", s1, build(Config, {"model": to_dict(s1.cfg)}))
    s2 = tiny_hmar(stage=2, stage1_ckpt=str(tmp_path / "s1"))
    s2.init_pretrained()
    assert torch.equal(s2.blocks[0].attn.proj.weight, s1.blocks[0].attn.proj.weight)
    assert torch.equal(s2.mask_blocks[0].ffn.fc1.weight, s1.blocks[1].ffn.fc1.weight)
    assert torch.equal(s2.mask_head.weight, s1.head.weight)
    bad = tiny_hmar(stage=2, stage1_ckpt=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="stage1_ckpt"):
        bad.init_pretrained()


# ----------------------------------------------------------------------------- editing


def test_hmar_edit_keeps_known_tokens_and_resamples_unknown_with_mask_head(monkeypatch):
    m = tiny_hmar(stage=2)
    randomize(m)
    B = 2
    images = torch.rand(B, 3, 16, 16) * 2 - 1
    keep_mask = torch.ones(B, 1, 16, 16, dtype=torch.bool)
    keep_mask[..., 8:, :] = False  # regenerate the bottom half
    known = m.tokenizer.img_to_indices(images)
    keep = m.keep_masks(keep_mask)
    calls = []
    real = m._mask_logits
    monkeypatch.setattr(m, "_mask_logits", lambda si, i, mk, c: calls.append(si) or real(si, i, mk, c))
    final: list[torch.Tensor] = []
    args = m._sampling_args(1.0, "linear", 1.0, 0, 0.0, 0, "cpu")
    opts = m._refine_options({"edit_refine_passes": 2}, editing=True)
    m._autoregress(torch.tensor([m.num_classes] * B), args, known, keep, out_indices=final, **opts)
    for si in range(len(m.patch_nums)):
        assert torch.equal(final[si][keep[si]], known[si][keep[si]])
    assert calls == [1, 1, 2, 2, 3, 3]
    out = m.edit(images, keep_mask, torch.tensor([0, 1]), seed=0)
    assert out.shape == images.shape


# ----------------------------------------------------------------------------- official checkpoints


@pytest.mark.skipif(not (REF / "hmar_d16_state_dict_shapes.json").exists(), reason="reference tables absent")
def test_hmar_d16_shape_table_loads_strictly_both_stages():
    sd = meta_official("hmar_d16_state_dict_shapes.json")
    for stage in (2, 1):
        cfg = convert_hmar._hmar_config(sd, 16, stage, 8)
        with torch.device("meta"):
            model = HMAR(cfg)
        ours = convert_hmar.check_and_drop_buffers(sd, model.pattern, "test")
        ours = convert_hmar.combined_to_ours(ours, stage)
        ours.update({f"tokenizer.{k}": v for k, v in model.tokenizer.state_dict().items()})
        model.load_state_dict(ours, strict=True, assign=True)
        n = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("tokenizer."))
        trainable = sum(p.numel() for _, p in model.named_trainable_parameters())
        if stage == 2:
            assert (n, trainable) == (467_691_904, 157_408_384)
            back, _ = convert_hmar.export_official(model)
            assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}
        else:
            assert n == 310_283_520


def test_hmar_convert_round_trips(tmp_path):
    s2 = tiny_hmar(stage=2)
    randomize(s2)
    combined, vae = convert_hmar.export_official(s2)
    assert "word_embed_bias" in combined and "ns_blocks.1.ffn.fc1.weight" in combined
    assert "base_blocks.0.attn.zero_k_bias" in combined and "blocks.0.ffn.fc1.weight" not in combined
    torch.save(combined, tmp_path / "hmar.pth")
    back = convert_hmar.load_official(tmp_path / "hmar.pth", vae, cfg=s2.cfg)
    assert back.stage == 2
    for k, v in s2.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    only_ns = convert_hmar.load_official(combined, vae, stage=1, cfg=s2.cfg)
    assert only_ns.stage == 1 and torch.equal(only_ns.head.weight, s2.head.weight)
    # stage-1 (NSP) + stage-2 (MP) training files -> our stage 2
    nsp, _ = convert_hmar.export_official(only_ns)
    assert torch.equal(nsp["attn_bias_for_masking"][0, 0] == 0, s2.pattern.dense_mask())
    mp = {k: v for k, v in nsp.items()}
    for i, blk in enumerate(s2.mask_blocks):
        for k, v in blk.state_dict().items():
            mp[f"blocks.{1 + i}.{k}"] = v
    for k, v in s2.mask_head.state_dict().items():
        mp[f"head.{k}"] = v
    for k, v in s2.mask_head_nm.state_dict().items():
        mp[f"head_nm.{k}"] = v
    mp["mask_embed.weight"] = s2.mask_embed.weight.detach()
    joined = convert_hmar.load_official(nsp, vae, mp=mp, cfg=s2.cfg)
    for k, v in s2.state_dict().items():
        assert torch.equal(joined.state_dict()[k], v), k
    with pytest.raises(Exception, match="no mask branch"):
        convert_hmar.load_official(nsp, vae, stage=2, cfg=s2.cfg)


def test_var_file_is_refused_as_hmar():
    from maskar.convert.var import official_buffers
    from maskar.nn.attention import ScalePattern

    s1 = tiny_hmar(stage=1)
    nsp, vae = convert_hmar.export_official(s1)
    nsp.update(official_buffers(ScalePattern("block_causal", s1.lengths), [], s1.C))
    with pytest.raises(Exception, match="block_diagonal"):
        convert_hmar.load_official(nsp, vae, cfg=s1.cfg)


def test_hmar_presets():
    ft = load_config("hmar-d16-finetune")
    assert ft.model.stage == 2 and ft.model.n_layers_train == 8 and ft.model.loss_weighting == "lognorm"
    assert (ft.sample.cfg, ft.sample.top_k, ft.sample.top_p) == (1.7, 1000, 0.99)
    for name in ("hmar-fmnist", "hmar-fmnist-finetune", "hmar-tiny"):
        cfg = load_config(name)
        validate_mask_schedule(cfg.sample.mask_schedule, cfg.model.tokenizer.patch_nums)


def test_convert_cli_round_trip(tmp_path):
    from maskar.checkpoint import load_model

    s2 = tiny_hmar(stage=2)
    randomize(s2)
    combined, vae = convert_hmar.export_official(s2)
    torch.save(combined, tmp_path / "hmar.pth")
    torch.save(vae, tmp_path / "vae.pth")
    out = tmp_path / "ckpt"
    args = [f"src={tmp_path / 'hmar.pth'}", f"vae={tmp_path / 'vae.pth'}", f"out={out}"]
    with pytest.raises(Exception, match="patch schedule"):  # non-official schedule: needs preset=
        convert_hmar.cli(args)
    # hmar-tiny has another tokenizer width; build a matching preset file
    import yaml

    from maskar.config import to_dict

    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"model": to_dict(s2.cfg)}))
    assert convert_hmar.cli(args + [f"preset={tmp_path / 'p.yaml'}"]) == 0
    back, _ = load_model(out, device="cpu")
    assert back.stage == 2
    for k, v in s2.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert convert_hmar.cli([f"ckpt={out}", f"out={tmp_path / 'again.pth'}"]) == 0
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert again.keys() == combined.keys() and all(torch.equal(again[k], combined[k]) for k in combined)


def test_bf16_autocast_paths_run():
    """The CLI samples under bf16 autocast on CUDA; the same code paths must hold dtypes together."""
    m = tiny_hmar(stage=2)
    randomize(m)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    keep = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    keep[..., :8] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.generate(torch.tensor([0, 1]), seed=0, refine_cfg=1.0)
        edited = m.edit(img, keep, torch.tensor([0, m.num_classes]), seed=0)
        m.train()
        loss = m.loss({"image": img, "label": torch.tensor([0, 1])})["loss"]
    loss.backward()
    assert out.dtype == edited.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backends_match_sdpa_and_sampling_runs():
    from maskar.nn.attention import set_backend

    for stage in (1, 2):
        m = tiny_hmar(stage=stage).cuda()
        randomize(m)
        labels = torch.tensor([0, 1], device="cuda")
        x = torch.randn(2, m.L - 1, m.z_channels, device="cuda")
        with torch.no_grad():
            set_backend(m, "sdpa")
            ref = m(labels, x)
            set_backend(m, "auto")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                got = m(labels, x)
                imgs = m.generate(labels, seed=0)
        assert (got - ref).abs().max() < 5e-2 * ref.abs().max()
        assert imgs.shape == (2, 3, 16, 16) and torch.isfinite(imgs).all()
