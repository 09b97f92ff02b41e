"""HMAR: hierarchical masked autoregressive image generation (Kumbong et al., CVPR 2025).

HMAR keeps VAR's tokenizer, inputs, blocks and head (``maskar.models.var``) and changes:

1. **Markovian next-scale prediction** (stage 1). Scale k attends only to itself: the
   training mask is **block-diagonal**, and earlier scales reach scale k only through
   its input ``word_embed(area_down(f_hat_{<k}))``. Sampling therefore runs one scale at
   a time with no KV cache.
2. **Per-scale loss weights**: ``lognorm`` (a normal pdf over the reversed side ratios),
   instead of VAR's 1/L per token.
3. **Masked refinement** (stage 2, a fine-tune). A mask embedding, copies of the last
   ``n_layers_train`` blocks (``mask_blocks``) and a second head (``mask_head``) learn to
   predict masked tokens of scale k from the Markov context plus the visible tokens of
   scale k (their own residual contribution ``area_down(phi_k(up(embed(r_k))))``).
   Mask ratio ~ U(0, 1) per step; CE on masked tokens only. Everything else is frozen.
   At sampling time a per-scale schedule says how many tokens the next-scale pass commits
   and how many each refinement pass re-samples (lowest confidence first).

A stage-2 model holds both networks: ``blocks`` + ``head`` (the frozen stage-1 next-scale
path) and ``blocks[:depth-n]`` + ``mask_blocks`` + ``mask_head`` (the refinement path),
which is exactly the released checkpoint's base / ns / mask split (see
``maskar.convert.hmar``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskar import registry
from maskar.config import ConfigError, field
from maskar.models.var import (
    NextScaleConfig,
    NextScaleModel,
    VARSampleConfig,
    load_model_weights,
    no_autocast,
    token_linears_of,
)
from maskar.nn.blocks import AdaLNBeforeHead
from maskar.nn.sampling import (
    CONFIDENCE_RULES,
    check_sampling_args,
    guided_logits,
    lowest_confidence,
    sample_from_logits,
    token_confidence,
)

# Official schedules (reference §4.5): the 256 px default of sample.py / evaluation and
# the 512 px one of the inference benchmark.
OFFICIAL_MASK_SCHEDULES = {
    (1, 2, 3, 4, 5, 6, 8, 10, 13, 16):
        [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64], [100], [169], [256]],
    (1, 2, 3, 4, 6, 9, 13, 18, 24, 32):
        [[1], [1, 3], [1, 1, 2, 5], [5, 11], [36], [81], [169], [324], [576], [1024]],
}  # fmt: skip


def default_mask_schedule(patch_nums: tuple[int, ...]) -> list[list[int]]:
    """Official table where one exists; otherwise refine the 2x2 and 3x3 scales like the 256 px default."""
    key = tuple(patch_nums)
    if key in OFFICIAL_MASK_SCHEDULES:
        return copy.deepcopy(OFFICIAL_MASK_SCHEDULES[key])
    rule = {2: [1, 3], 3: [1, 1, 2, 5]}
    return [list(rule.get(pn, [pn * pn])) for pn in patch_nums]


def validate_mask_schedule(schedule, patch_nums: tuple[int, ...]) -> list[list[int]]:
    """One list per scale of positive ints summing to that scale's token count; else ValueError."""
    K = len(patch_nums)
    if not isinstance(schedule, (list, tuple)) or len(schedule) != K:
        n = len(schedule) if isinstance(schedule, (list, tuple)) else "not a list"
        raise ConfigError(
            f"mask_schedule: expected {K} lists (one per scale, sides {list(patch_nums)}), "
            f"got {n}: {schedule!r}"
        )
    out = []
    for si, (entry, pn) in enumerate(zip(schedule, patch_nums)):
        if not isinstance(entry, (list, tuple)) or not entry:
            raise ConfigError(f"mask_schedule[{si}]: expected a non-empty list of counts, got {entry!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in entry):
            raise ConfigError(f"mask_schedule[{si}]: expected positive integers, got {list(entry)!r}")
        if sum(entry) != pn * pn:
            raise ConfigError(
                f"mask_schedule[{si}]: entries must sum to the scale's {pn}x{pn} = {pn * pn} tokens, "
                f"got {list(entry)} (sum {sum(entry)})"
            )
        out.append([int(v) for v in entry])
    return out


# How refinement passes are guided: the cfg schedule with refine_cfg, refine_cfg at every pass,
# or the released code's hard-coded t = cfg * 1e-6 (reference §4.4, §7 pitfall 5).
REFINE_CFG_SCHEDULES = ("same", "constant", "official")

# ----------------------------------------------------------------------------- configs


@dataclass
class HMARConfig(NextScaleConfig):
    arch: str = "hmar"
    loss_weighting: str = field("lognorm", choices=("uniform", "lognorm", "linear", "equal"))
    stage: int = field(1, choices=(1, 2), help="1: next-scale training; 2: masked-prediction fine-tune")
    n_layers_train: int = field(8, min=1, help="stage 2: trailing blocks copied into mask_blocks")
    mask_positions: str = field(
        "shared", choices=("shared", "per_sample"), help="stage 2: masked positions shared across the batch"
    )
    stage1_ckpt: str | None = field(None, help="stage 2: stage-1 checkpoint dir loaded at a fresh start")

    def validate(self) -> None:
        super().validate()
        if self.stage == 2 and self.n_layers_train > self.depth:
            raise ValueError(f"n_layers_train={self.n_layers_train} exceeds depth={self.depth}")


@dataclass
class HMARSampleConfig(VARSampleConfig):
    """Defaults of the official sampling args (cfg 1.5, top_k 900, top_p 0.96, refinement on)."""

    mask_schedule: list[list[int]] | None = field(
        None, help="per scale [next-scale count, refine counts...], each summing to pn^2; null = official"
    )
    refine: bool | None = field(None, help="masked refinement; null = when the model has a mask head")
    refine_cfg: float = field(
        0.0, min=0.0, help="CFG scale of refinement passes (see refine_cfg_schedule); 0 = unguided"
    )
    refine_cfg_schedule: str = field(
        "same",
        choices=REFINE_CFG_SCHEDULES,
        help="same: refine_cfg on the cfg schedule; constant: refine_cfg; official: cfg*1e-6 (released code)",
    )
    confidence: str = field(
        "official",
        choices=CONFIDENCE_RULES,
        help="refinement ranking: official = filtered softmax (released code); unfiltered = old maskar rule",
    )
    edit_refine_passes: int = field(1, min=0, help="edit: mask-head passes over the unknown tokens per scale")

    def validate(self) -> None:
        if self.mask_schedule is not None:
            for si, entry in enumerate(self.mask_schedule):
                if not entry or any(v < 1 for v in entry):
                    raise ValueError(f"mask_schedule[{si}]: expected positive token counts, got {entry}")


# ----------------------------------------------------------------------------- model


def _keep_lowest(conf: Tensor, masked: Tensor, count: Tensor | int) -> Tensor:
    """Among ``masked`` positions keep the ``count`` (per sample) with the lowest confidence
    (stable: ties in position order). Editing uses it; its counts differ per sample."""
    conf = conf.masked_fill(~masked, float("inf"))
    rank = conf.argsort(dim=1, stable=True).argsort(dim=1)  # (B, n) rank by ascending confidence
    if not isinstance(count, Tensor):
        count = torch.full((conf.shape[0],), int(count), device=conf.device)
    return (rank < count.view(-1, 1)) & masked


class HMAR(NextScaleModel):
    pattern_kind = "block_diagonal"
    uses_kv_cache = False  # each scale sees only itself: nothing to cache
    device_mask_draws = False  # stage 2: draw the training mask ratio on the device (prepare_graph_step)

    def __init__(self, cfg: HMARConfig) -> None:
        super().__init__(cfg)
        self.stage = cfg.stage
        if cfg.stage == 2:
            n = cfg.n_layers_train
            self.mask_embed = nn.Embedding(1, self.C)  # (1, C) replaces W x_own at masked positions
            self.mask_blocks = nn.ModuleList(copy.deepcopy(b) for b in self.blocks[-n:])
            self.mask_head_nm = AdaLNBeforeHead(self.C, self.C, cfg.norm_eps)
            self.mask_head = nn.Linear(self.C, self.vocab_size)
            self._init_mask_branch()
            for name, p in self.named_parameters():
                p.requires_grad_(name.startswith("mask_"))

    @property
    def has_mask_head(self) -> bool:
        return self.stage == 2

    @property
    def mask_path(self) -> list[nn.Module]:
        """Blocks of the refinement network: the shared base blocks, then mask_blocks."""
        return list(self.blocks[: self.depth - len(self.mask_blocks)]) + list(self.mask_blocks)

    @torch.no_grad()
    def _init_mask_branch(self) -> None:
        """Stage-2 start: mask blocks / head begin as the stage-1 ones (as the official fine-tune)."""
        n = len(self.mask_blocks)
        for dst, src in zip(self.mask_blocks, self.blocks[-n:]):
            dst.load_state_dict(src.state_dict())
        self.mask_head.load_state_dict(self.head.state_dict())
        self.mask_head_nm.load_state_dict(self.head_nm.state_dict())
        std = self.cfg.init_std if self.cfg.init_std >= 0 else math.sqrt(1 / self.C / 3)
        nn.init.trunc_normal_(self.mask_embed.weight, std=std)

    def init_pretrained(self) -> None:
        """Fresh run: stage 2 starts from ``stage1_ckpt``; then the tokenizer from ``tokenizer_ckpt``."""
        if self.stage == 2 and self.cfg.stage1_ckpt is not None:
            sd = load_model_weights(self.cfg.stage1_ckpt, "model.stage1_ckpt")
            own = {k: v for k, v in self.state_dict().items() if not k.startswith("mask_")}
            missing = sorted(set(own) - set(sd))
            unexpected = sorted(k for k in set(sd) - set(own) if not k.startswith("mask_"))
            bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
            if missing or unexpected or bad:
                raise ConfigError(
                    f"model.stage1_ckpt={self.cfg.stage1_ckpt!r} does not match this model: missing "
                    f"{missing[:5]}, unexpected {unexpected[:5]}, mis-shaped {bad[:5]}"
                )
            self.load_state_dict({k: sd[k] for k in own}, strict=False)
            self._init_mask_branch()
            self._tokenizer_from_stage1 = True  # the stage-1 file carries the trained tokenizer
        super().init_pretrained()

    def named_trainable_parameters(self):
        if self.stage == 1:
            yield from super().named_trainable_parameters()
            return
        for n, p in self.named_parameters():
            if n.startswith("mask_"):
                yield n, p

    # ------------------------------------------------------------------ training

    def mask_input(self, x_ctx: Tensor, x_own: Tensor, masked: Tensor) -> Tensor:
        """W x_ctx + b + (mask_embed where masked else W x_own) -> (B, n, C)."""
        own = F.linear(x_own, self.word_embed.weight)
        m = self.mask_embed.weight.to(own.dtype)
        return self.word_embed(x_ctx) + torch.where(masked.unsqueeze(-1), m, own)

    def sample_train_mask(self, batch: int, device: torch.device, ratio: float | None = None) -> Tensor:
        """(B or 1, L-1) bool: ratio ~ U(0, 1]; ceil(ratio * pn^2) positions per scale k >= 1."""
        if ratio is None and self.device_mask_draws:
            return self._device_train_mask(batch, device)
        if ratio is None:
            ratio = 1.0 - torch.rand(()).item()  # in (0, 1], so every scale masks >= 1 token
        shared = self.cfg.mask_positions == "shared"
        rows = 1 if shared else batch
        parts = []
        for pn in self.patch_nums[1:]:
            n = pn * pn
            k = math.ceil(n * ratio)
            order = torch.rand(rows, n, device=device).argsort(dim=1)
            m = torch.zeros(rows, n, dtype=torch.bool, device=device)
            parts.append(m.scatter(1, order[:, :k], True))
        return torch.cat(parts, dim=1)

    def _device_train_mask(self, batch: int, device: torch.device) -> Tensor:
        """:meth:`sample_train_mask`'s distribution drawn on ``device`` alone (a CUDA-graph step
        replays it with fresh draws): the ratio a 0-d tensor, each scale's masked positions those
        whose uniform score ranks below ceil(ratio * pn^2), a uniformly random subset of that
        size as the first k of a random permutation is."""
        ratio = 1.0 - torch.rand((), device=device)
        rows = 1 if self.cfg.mask_positions == "shared" else batch
        parts = []
        for pn in self.patch_nums[1:]:
            n = pn * pn
            rank = torch.rand(rows, n, device=device).argsort(dim=1).argsort(dim=1)
            parts.append(rank < torch.ceil(n * ratio))
        return torch.cat(parts, dim=1)

    def mask_hidden(
        self, labels: Tensor, x_ctx: Tensor, x_own: Tensor, masked: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Refinement network up to its head: hidden states (B, L, C) and the class embedding (B, C)."""
        h, cond = self.embed(labels, self.mask_input(x_ctx, x_own, masked))
        return self.run_blocks(h, cond, self.mask_path, self.pattern), cond

    def mask_forward(self, labels: Tensor, x_ctx: Tensor, x_own: Tensor, masked: Tensor) -> Tensor:
        """Teacher-forced refinement network. x_* (B, L-1, Cz), masked (B|1, L-1) -> logits (B, L, V)."""
        h, cond = self.mask_hidden(labels, x_ctx, x_own, masked)
        return self.logits(h, cond, self.mask_head, self.mask_head_nm)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.stage == 1:
            return super().loss(batch)
        indices = self.batch_indices(batch)
        with torch.no_grad(), no_autocast(indices[0].device):
            x_ctx = self.tokenizer.teacher_forcing_input(indices).float()  # (B, L-1, Cz)
            x_own = self.tokenizer.own_residual_input(indices).float()  # (B, L-1, Cz)
        B = x_ctx.shape[0]
        masked = self.sample_train_mask(B, x_ctx.device).expand(B, -1)  # (B, L-1)
        labels = self.drop_labels(batch["label"].long())
        return self.masked_loss(labels, x_ctx, x_own, masked, torch.cat(indices, dim=1))

    def masked_loss(
        self, labels: Tensor, x_ctx: Tensor, x_own: Tensor, masked: Tensor, target: Tensor
    ) -> dict[str, Tensor]:
        """Stage 2's differentiable step (``train.compile=full`` compiles it whole): mean CE over
        the masked tokens. masked (B, L-1) bool (the class token is never masked), target (B, L).

        Written as a weighted CE over every token (weight 1/count where masked, else 0), so that
        shapes never depend on the mask: equal to ``F.cross_entropy(logits[masked], ...)``.
        """
        h, cond = self.mask_hidden(labels, x_ctx, x_own, masked)
        m = F.pad(masked, (1, 0))  # (B, L)
        count = m.sum()
        loss, _, correct = self.head_loss(h, cond, target, m / count, self.mask_head, self.mask_head_nm)
        acc = (correct & m).sum() / count
        return {"loss": loss, "acc_masked": acc, "mask_ratio": masked.float().mean()}

    def compiled_methods(self, mode: str) -> tuple[str, ...]:
        return ("next_scale_loss", "masked_loss") if mode == "full" else ("head_loss",)

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.blocks) + (list(self.mask_blocks) if self.stage == 2 else [])

    def token_linears(self) -> list[nn.Linear]:
        if self.stage == 1:
            return super().token_linears()
        return [self.word_embed, self.mask_head] + token_linears_of(self.mask_path)

    def prepare_graph_step(self) -> str | None:
        # stage 2's mask ratio is a host draw, which a graph would replay frozen: draw it on the GPU
        self.device_mask_draws = True
        return super().prepare_graph_step()

    def train_flops_per_sample(self) -> float:
        """Stage 1: VAR's 6 N L. Stage 2: the frozen base blocks need input gradients only (4 per
        weight and token: the trained mask embedding sits below them), the word embedding runs
        twice forward (4), the mask blocks and head are trained (6)."""
        if self.stage == 1:
            return super().train_flops_per_sample()
        frozen = token_linears_of(self.blocks[: self.depth - len(self.mask_blocks)])
        trained = token_linears_of(self.mask_blocks) + [self.mask_head]
        per_token = 4 * sum(m.weight.numel() for m in frozen) + 6 * sum(m.weight.numel() for m in trained)
        per_token += 4 * self.word_embed.weight.numel()
        return float(per_token * self.L)

    # ------------------------------------------------------------------ sampling

    def _refine_options(self, extra: dict, editing: bool) -> dict:
        extra = dict(extra)
        schedule = extra.pop("mask_schedule", None)
        refine = extra.pop("refine", None)
        refine_cfg = float(extra.pop("refine_cfg", 0.0))
        refine_schedule = extra.pop("refine_cfg_schedule", "same")
        confidence = extra.pop("confidence", "official")
        passes = extra.pop("edit_refine_passes", 1)
        if extra:
            raise TypeError(f"HMAR.generate: unknown sampling arguments {sorted(extra)}")
        if refine and not self.has_mask_head:
            raise ConfigError(
                "refine=true needs a stage-2 model (mask head); this checkpoint is stage 1. "
                "Use refine=null or false."
            )
        if not refine_cfg >= 0:
            raise ConfigError(f"refine_cfg: expected a guidance scale >= 0, got {refine_cfg!r}")
        if refine_schedule not in REFINE_CFG_SCHEDULES:
            raise ConfigError(
                f"refine_cfg_schedule: expected one of {list(REFINE_CFG_SCHEDULES)}, got {refine_schedule!r}"
            )
        if confidence not in CONFIDENCE_RULES:
            raise ConfigError(f"confidence: expected one of {list(CONFIDENCE_RULES)}, got {confidence!r}")
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
            raise ConfigError(f"edit_refine_passes: expected an integer >= 0, got {passes!r}")
        schedule = default_mask_schedule(self.patch_nums) if schedule is None else schedule
        schedule = validate_mask_schedule(schedule, self.patch_nums)
        on = self.has_mask_head if refine is None else bool(refine)
        return {
            "schedule": schedule,
            "refine_on": on,
            "refine_cfg": refine_cfg,
            "refine_cfg_schedule": refine_schedule,
            "confidence": confidence,
            "edit_passes": passes,
        }

    def refinement_guidance(
        self, si: int, cfg: float, refine_cfg: float, cfg_schedule: str, mode: str
    ) -> float:
        """CFG weight t of a refinement pass at scale si (``mode``: see REFINE_CFG_SCHEDULES)."""
        if mode == "official":
            return cfg * 1e-6  # the released sampler's hard-coded ratio, same arithmetic
        return self.guidance(refine_cfg, si, "constant" if mode == "constant" else cfg_schedule)

    def _refinement_logits(
        self, si: int, idx: Tensor, masked: Tensor, cond: Tensor, ctx_in: Tensor, lvl_pos: Tensor, t: float
    ) -> Tensor:
        """Guided mask-head logits (B, pn^2, V) float32; cond (2B, C) = class_emb([labels; null]),
        ctx_in (B, pn^2, Cz) = area_down(f_hat of the earlier scales, pn)."""
        B, pn = idx.shape[0], self.patch_nums[si]
        with no_autocast(idx.device):
            h_map = self.tokenizer.lookup(idx).float().transpose(1, 2).reshape(B, self.z_channels, pn, pn)
            x_own = self.tokenizer.own_residual(si, h_map).float().flatten(2).transpose(1, 2)  # (B, n, Cz)
        b, e = self.begin_ends[si]
        x = self.mask_input(ctx_in, x_own, masked) + lvl_pos[:, b:e]
        if t == 0.0:  # unguided: skip the null-class half
            cond = cond[:B]
        else:
            x = torch.cat([x, x])
        h = self.run_blocks(x, cond, self.mask_path, None)
        return guided_logits(self.logits(h, cond, self.mask_head, self.mask_head_nm), B, t)

    def _pass_guidance(self, si: int, ctx: dict) -> float:
        args = ctx["args"]
        mode = ctx.get("refine_cfg_schedule", "same")
        return self.refinement_guidance(si, args.cfg, ctx["refine_cfg"], args.cfg_schedule, mode)

    def _mask_logits(self, si: int, idx: Tensor, masked: Tensor, ctx: dict) -> Tensor:
        """One refinement pass at scale si inside the sampling loop (``ctx`` of ``_autoregress``)."""
        t = self._pass_guidance(si, ctx)
        return self._refinement_logits(si, idx, masked, ctx["cond"], ctx["ctx_in"], ctx["lvl_pos"], t)

    @torch.no_grad()
    def refinement_logits(
        self, labels: Tensor, si: int, f_hat: Tensor, tokens: Tensor, masked: Tensor, *, cfg: float = 0.0
    ) -> Tensor:
        """Guided mask-head logits (B, pn^2, V) float32 of one refinement pass at scale si.

        ``f_hat`` (B, Cz, h, w): the cumulative f_hat of the scales before si (a trace's
        ``info["f_hat"]`` of scale si-1, or ``tokenizer.indices_to_fhats``); ``tokens`` (B, pn^2)
        the scale's current ids; ``masked`` (B, pn^2) bool, the positions to re-predict (they
        get the mask embedding); ``cfg`` the guidance weight t of the pass: (1+t) cond - t uncond.
        """
        if not self.has_mask_head:
            raise ConfigError("refinement_logits: this is a stage-1 HMAR (no mask head)")
        pn = self.patch_nums[si]
        if pn == 1:
            raise ConfigError(f"refinement_logits: scale {si} is 1x1; refinement needs pn > 1")
        labels = self._check_labels(labels)
        B = labels.shape[0]
        if tuple(tokens.shape) != (B, pn * pn) or tuple(masked.shape) != (B, pn * pn):
            raise ConfigError(
                f"refinement_logits: tokens / masked must be (B, pn^2) = {(B, pn * pn)}, "
                f"got {tuple(tokens.shape)} / {tuple(masked.shape)}"
            )
        cond = self.class_emb(torch.cat([labels, torch.full_like(labels, self.num_classes)]))
        with no_autocast(f_hat.device):
            ctx_in = self.tokenizer.area_down(f_hat.float(), pn).flatten(2).transpose(1, 2)  # (B, pn^2, Cz)
        return self._refinement_logits(
            si, tokens.long(), masked.bool(), cond, ctx_in, self.lvl_pos(), float(cfg)
        )

    @torch.no_grad()
    def refine_pass(
        self,
        labels: Tensor,
        si: int,
        f_hat: Tensor,
        tokens: Tensor,
        masked: Tensor,
        *,
        cfg: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One refinement pass: (tokens with the ``masked`` positions re-drawn, guided logits).

        Arguments as :meth:`refinement_logits`; the draw is :func:`maskar.nn.sampling.
        sample_from_logits` with top-k / top-p / temperature. Rank the result with
        :func:`~maskar.nn.sampling.token_confidence` and :func:`~maskar.nn.sampling.lowest_confidence`
        to choose the next pass's positions, as ``generate`` does.
        """
        check_sampling_args(0.0, temperature, top_k, top_p)
        logits = self.refinement_logits(labels, si, f_hat, tokens, masked, cfg=cfg)
        new = sample_from_logits(logits, top_k, top_p, temperature, generator, method=self.sampler)
        return torch.where(masked.bool(), new, tokens.long()), logits

    def _refine(self, si: int, idx: Tensor, guided: Tensor, ctx: dict, known: Tensor | None) -> Tensor:
        """Masked refinement of scale si after its next-scale pass (reference §4.4).

        Generation: the schedule's later entries are re-sampled, lowest confidence first; the
        confidence rule is ``ctx["confidence"]`` (official: the drawn token's probability under
        the filtered distribution it was drawn from). Each later pass re-ranks the still-masked
        tokens in their current order (stable), as the released sampler does. Editing: the
        unknown tokens are re-sampled with the mask head while the known ones stay visible.
        """
        n = idx.shape[1]
        if not ctx["refine_on"] or n == 1:
            return idx
        args = ctx["args"]
        rule = ctx.get("confidence", "official")

        def confidence(logits: Tensor, tokens: Tensor) -> Tensor:
            return token_confidence(
                logits, tokens, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, rule=rule
            )

        def draw(logits: Tensor) -> Tensor:
            noise = ctx["noise"](logits.shape[0] * logits.shape[1])
            return sample_from_logits(
                logits, args.top_k, args.top_p, args.temperature, noise=noise, method=args.sampler
            )

        trace = ctx.get("trace")

        def record(tokens: Tensor, masked: Tensor, logits: Tensor, order: Tensor | None = None) -> None:
            if trace is not None:
                info = {"cfg": self._pass_guidance(si, ctx)}
                if order is not None:
                    info["order"] = order  # the masked positions, lowest confidence first
                trace.add("refine", si, tokens, masked, logits, **info)

        if known is not None:  # editing: per-sample counts of unknown tokens
            passes = ctx["edit_passes"]
            masked = ~known
            if passes == 0 or not masked.any():
                return idx
            n_unknown = masked.sum(1)
            for j in range(passes):
                with self._region(f"s{si:02d} refine{j + 1}"):
                    logits = self._mask_logits(si, idx, masked, ctx)
                new = draw(logits)
                idx = torch.where(masked, new, idx)
                record(idx, masked, logits)
                masked = _keep_lowest(
                    confidence(logits, idx), masked, (n_unknown * (passes - j - 1)) // passes
                )
                if not masked.any():
                    break
            return idx
        sched = ctx["schedule"][si]
        if len(sched) == 1:
            return idx
        order = lowest_confidence(confidence(guided, idx), sum(sched[1:]))  # (B, m), lowest first
        for step in range(1, len(sched)):
            with self._region(f"s{si:02d} refine{step}"):
                masked = torch.zeros_like(idx, dtype=torch.bool).scatter(1, order, True)
                logits = self._mask_logits(si, idx, masked, ctx)
                idx = torch.where(masked, draw(logits), idx)
                record(idx, masked, logits, order)
                if step < len(sched) - 1:
                    order = lowest_confidence(confidence(logits, idx), sum(sched[step + 1 :]), among=order)
        return idx

    def _needs_guided_logits(self, si: int, ctx: dict, known: Tensor | None) -> bool:
        """The first refinement ranking reads the guided logits of every token of the scale."""
        if not ctx["refine_on"] or self.patch_nums[si] == 1:
            return False
        return known is None and len(ctx["schedule"][si]) > 1  # editing ranks by the mask head only

    def _autoregress(
        self, labels, args, known=None, keep=None, collect=None, out_indices=None, trace=None, **refine_kw
    ):
        if not refine_kw:  # direct calls (tests) get the defaults
            refine_kw = self._refine_options({}, editing=known is not None)
        return super()._autoregress(labels, args, known, keep, collect, out_indices, trace, **refine_kw)


registry.register(
    "hmar",
    kind="generator",
    config_cls=HMARConfig,
    sample_cls=HMARSampleConfig,
    build=HMAR.from_config,
    description="HMAR Markovian next-scale prediction + masked refinement (block-diagonal)",
)
