"""Reference copies of the MAR / CASMAR sampling loops as they were before the shared loop
(models/mar.py ``MAR.sample_tokens``, models/casmar.py ``CASMAR.sample_scaffold`` and
``refine_from_scaffold_embedding`` at commit 9a92474), written out step by step as plain
functions over a model's pieces. tests/test_masked_loop.py runs them against the models'
samplers: the refactor must give the same tokens, draws and traces bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from maskar.models.casmar import _grid, _tokens, saliency_scores
from maskar.models.mar import _gather_rows, cosine_mask_ratio, mask_from_order


@torch.no_grad()
def mar_sample_tokens(
    model,
    labels,
    *,
    num_iter=64,
    cfg=1.0,
    cfg_schedule="linear",
    temperature=1.0,
    num_sampling_steps=None,
    generator=None,
    known=None,
    known_mask=None,
    trace=None,
    cuda_graph=None,
):
    b, n, device = labels.shape[0], model.seq_len, labels.device
    rand = torch.rand(b, n, generator=generator, device=device)
    n_unknown = n
    if known is not None:
        counts = (~known_mask).sum(1)
        n_unknown = int(counts[0])
        rand = rand + known_mask.float() * 2
    tokens, _ = model._start_tokens(b, n, known, known_mask, device)
    orders = torch.argsort(rand, dim=1)
    class_emb = model._class_emb_cfg(labels, cfg)
    num_masked = n_unknown
    with model._eval_mode():
        for step in range(num_iter):
            if num_masked == 0:
                break
            mask = mask_from_order(orders, num_masked)
            x_in, mask_in = tokens, mask
            if cfg != 1.0:
                x_in, mask_in = torch.cat([tokens, tokens]), torch.cat([mask, mask])
            x, keep = model.forward_encoder(x_in, mask_in, class_emb, num_masked)
            z = model.forward_decoder(x, keep)
            ratio = cosine_mask_ratio(step, num_iter)
            mask_len = max(1, min(num_masked - 1, math.floor(n_unknown * ratio)))
            next_masked = 0 if step >= num_iter - 1 else mask_len
            idx = orders[:, next_masked:num_masked]
            cfg_iter = model._cfg_scale(cfg, cfg_schedule, n - mask_len, n)
            if idx.shape[1] > 0:
                z_idx = torch.cat([idx, idx]) if cfg != 1.0 else idx
                z_sel = _gather_rows(z, z_idx).reshape(-1, z.shape[-1])
                new = model.diffloss.sample(
                    z_sel,
                    temperature,
                    cfg_iter,
                    num_sampling_steps=num_sampling_steps,
                    generator=generator,
                    cuda_graph=cuda_graph,
                )
                new = new[: b * idx.shape[1]].reshape(b, idx.shape[1], -1)
                tokens = tokens.scatter(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), new.float())
            if trace is not None:
                revealed = torch.zeros_like(mask).scatter(1, idx, True)
                trace.add("mar", step, tokens, revealed, input_mask=mask, cfg=cfg_iter)
            num_masked = next_masked
    return tokens


@torch.no_grad()
def casmar_sample_scaffold(
    model,
    labels,
    *,
    num_iter=32,
    cfg=1.0,
    cfg_schedule="linear",
    temperature=1.0,
    num_sampling_steps=None,
    generator=None,
    known=None,
    known_mask=None,
    trace=None,
):
    b, s, device = labels.shape[0], model.scaffold_len, labels.device
    small, known_mask = model._start_tokens(b, s, known, known_mask, device)
    small_z = torch.zeros(b, s, model.cfg.decoder_embed_dim, device=device)
    mask = ~known_mask
    predicted = torch.zeros_like(mask)
    big = torch.zeros(b, model.seq_len, model.token_channels, device=device)
    big_masked = torch.ones(b, model.seq_len, dtype=torch.bool, device=device)
    class_emb = model._class_emb_cfg(labels, cfg)
    with model._eval_mode():
        for step in range(num_iter):
            num_masked = int(mask[0].sum())
            if num_masked == 0:
                break
            full_mask = torch.cat([mask, big_masked], 1)
            scaffold = model.cond_proj(small)
            if cfg != 1.0:
                scaffold, big_in, full_mask = (torch.cat([t, t]) for t in (scaffold, big, full_mask))
            else:
                big_in = big
            x, keep = model.forward_encoder(
                scaffold, big_in, full_mask, class_emb, 0, num_masked + model.seq_len
            )
            z = model.forward_decoder(x, keep, 0)[:, :s]
            mask_next, _, sams = model._next_mask(z[:b], mask, step, num_iter, known_mask, generator, trace)
            sams = sams if trace is not None else None
            to_pred = mask & ~mask_next
            stuck = mask.any(1) & ~to_pred.any(1)
            if bool(stuck.any()):
                scores = saliency_scores(z[:b]).masked_fill(~mask, -math.inf)
                pick = F.one_hot(scores.argmax(1), s).bool()
                to_pred = to_pred | (pick & stuck[:, None])
            cfg_iter = model._cfg_scale(cfg, cfg_schedule, s - int(mask_next[0].sum()), s)
            z_sel = z[:b][to_pred]
            if cfg != 1.0:
                z_sel = torch.cat([z_sel, z[b:][to_pred]])
            new = model.diffloss.sample(
                z_sel, temperature, cfg_iter, num_sampling_steps=num_sampling_steps, generator=generator
            )
            small[to_pred] = new[: int(to_pred.sum())].float()
            small_z[to_pred] = z[:b][to_pred].float()
            predicted |= to_pred
            if trace is not None:
                trace.add(
                    "scaffold",
                    step,
                    small.clone(),
                    to_pred,
                    input_mask=mask,
                    next_mask=mask_next,
                    cfg=cfg_iter,
                    sams=sams,
                )
            mask = mask_next
    return small, small_z, predicted


@torch.no_grad()
def casmar_refine(
    model,
    labels,
    scaffold,
    *,
    num_iter=4,
    cfg=1.0,
    cfg_schedule="linear",
    temperature=1.0,
    num_sampling_steps=None,
    generator=None,
    known=None,
    known_mask=None,
    trace=None,
):
    b, n, s, device = labels.shape[0], model.seq_len, model.scaffold_len, labels.device
    h, w = model.seq_h, model.seq_w
    tokens, known_mask = model._start_tokens(b, n, known, known_mask, device)
    mask = ~known_mask
    scaffold_mask = torch.zeros(b, s, dtype=torch.bool, device=device)
    class_emb = model._class_emb_cfg(labels, cfg)
    head_labels = labels
    if cfg != 1.0:
        scaffold = torch.cat([scaffold, scaffold])
        head_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    with model._eval_mode():
        for step in range(num_iter):
            num_masked = int(mask[0].sum())
            if num_masked == 0:
                break
            full_mask = torch.cat([scaffold_mask, mask], 1)
            tok_in = tokens
            if cfg != 1.0:
                tok_in, full_mask = torch.cat([tokens, tokens]), torch.cat([full_mask, full_mask])
            x, keep = model.forward_encoder(scaffold, tok_in, full_mask, class_emb, 1, num_masked)
            z = model.forward_decoder(x, keep, 1)[:, s:]
            mask_next, _, sams = model._next_mask(z[:b], mask, step, num_iter, known_mask, generator, trace)
            sams = sams if trace is not None else None
            cfg_iter = model._cfg_scale(cfg, cfg_schedule, n - int(mask_next[0].sum()), n)
            visible = _grid((~mask).float()[..., None], h, w).bool()
            known_grid = _grid(tokens, h, w)
            if cfg != 1.0:
                visible, known_grid = torch.cat([visible, visible]), torch.cat([known_grid, known_grid])
            new = model.cond_diffloss.sample(
                _grid(z, h, w),
                temperature,
                cfg_iter,
                labels=head_labels,
                num_sampling_steps=num_sampling_steps,
                generator=generator,
                known=known_grid,
                known_mask=visible,
            )
            tokens = torch.where(mask[..., None], _tokens(new[:b]).float(), tokens)
            if trace is not None:
                trace.add("refine", step, tokens, mask, next_mask=mask_next, cfg=cfg_iter, sams=sams)
            mask = mask_next
    return tokens
