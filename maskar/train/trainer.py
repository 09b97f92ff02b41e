"""The training loop shared by every model: ``train(cfg) -> out_dir``.

One process or many (torchrun; DDP, or FSDP2 with ``train.parallel=fsdp2``: see
:mod:`maskar.train.parallelize`); bf16/fp16/fp32 autocast; gradient accumulation; AdamW with
decay and no-decay groups; warm-up + LR schedules; grad clipping; EMA; an optional discriminator
optimizer; step checkpoints (atomic) with exact resume; tqdm, ``log.txt`` and TensorBoard.

The model surface it uses is documented in docs/architecture.md: ``loss(batch)`` and the
optional hooks ``named_trainable_parameters``, ``no_weight_decay_keywords``,
``disc_parameters`` / ``disc_loss``, ``on_train_start``, ``on_train_step_end``,
``init_pretrained`` and the attribute ``ddp_find_unused_parameters``.

Resume is exact: the checkpoint holds weights, EMA, optimizer and scaler states, every
rank's RNG states, the step and the data position (epoch, batch within the epoch). The
data order is a function of (seed, epoch) only, so a resumed run skips the consumed
batches and continues with the very batches the uninterrupted run would have seen. A sharded
run saves its weights, EMA and optimizer state with ``torch.distributed.checkpoint`` (plus the
gathered weights as safetensors); any run resumes from either format on any number of ranks.

The run directory is guarded before any work starts (docs/reliability.md): a lock file
(one trainer per directory), the architecture it belongs to, leftovers of interrupted saves
removed. A non-finite loss stops the run with its step number and saves nothing after it, so
the latest checkpoint stays the last good one.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import signal
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from maskar import checkpoint as ckpt
from maskar.config import Config, ConfigError, TrainConfig, dump_yaml
from maskar.train import distributed as D
from maskar.train import parallelize as P
from maskar.train.clipping import clip_and_step, total_norm
from maskar.train.ema import EMA
from maskar.train.graph_step import GraphedStep, as_capturable, portable_state_dict, prepare_for_graph, set_lr
from maskar.train.logging import RunLogger, max_memory_gb
from maskar.train.master_weights import MasterWeights
from maskar.train.schedule import lr_from_config

# ----------------------------------------------------------------------------- model pieces


class _LossCall(nn.Module):
    """Routes ``forward(batch, fn)`` to ``model.loss`` / ``model.disc_loss``.

    DDP synchronises gradients (and FSDP2 gathers the weights outside the blocks) only for
    calls that go through its ``forward``, and the model surface is ``loss(batch)``; this
    adapter is what DDP / FSDP2 / torch.compile wrap.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor], fn: str = "loss") -> dict[str, Tensor]:
        return getattr(self.model, fn)(batch)


def trainable_parameters(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(main, discriminator) named parameters, following the model's optional hooks."""
    names = {id(p): n for n, p in model.named_parameters()}
    disc: list[tuple[str, nn.Parameter]] = []
    if hasattr(model, "disc_parameters"):
        for p in model.disc_parameters():
            if id(p) not in names:
                raise ValueError("disc_parameters() returned a tensor that is not a parameter of the model")
            disc.append((names[id(p)], p))
    disc_ids = {id(p) for _, p in disc}
    if hasattr(model, "named_trainable_parameters"):
        main = list(model.named_trainable_parameters())
    else:
        main = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in disc_ids]
    if not main:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return main, disc


def param_groups(
    named: list[tuple[str, nn.Parameter]], weight_decay: float, no_decay_keywords: set[str]
) -> list[dict[str, Any]]:
    """AdamW groups: weight decay for matrices/kernels; none for 1-D, biases and keyword matches."""
    decay, no_decay = [], []
    for name, p in named:
        if p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in no_decay_keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_optimizer(
    named: list[tuple[str, nn.Parameter]], model: nn.Module, cfg: Config, lr: float, device: torch.device
) -> torch.optim.AdamW:
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    groups = param_groups(named, cfg.train.weight_decay, keywords)
    kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(cfg.train.betas)}
    offloaded = cfg.train.parallel == "fsdp2" and cfg.train.fsdp_cpu_offload  # the step runs on the CPU
    if device.type == "cuda" and not offloaded:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def graph_refusal(tc: TrainConfig, device: torch.device, world_size: int) -> str | None:
    """Why the settings and the device keep the step from one CUDA graph (``train.cuda_graph``),
    or None; the model answers for itself later (:func:`prepare_for_graph`). ``true`` turns a
    reason into an error, ``auto`` into eager launches."""
    if device.type != "cuda" or world_size > 1:
        where = f"{world_size} processes" if world_size > 1 else f"device {device}"
        return f"needs one process on a CUDA device, got {where}"
    return tc.graph_refusal()


def master_weights_on(tc: TrainConfig, amp_dtype: torch.dtype | None, graph: bool | None = None) -> bool:
    """``train.master_weights`` resolved: ``auto`` is on wherever the step is a CUDA graph under
    bf16 autocast (faster in every pair measured: docs/benchmarks.md). ``graph``: whether the
    step runs as one (default: ``train.cuda_graph`` is not false)."""
    if not (tc.cuda_graph is not False if graph is None else graph):
        return False
    if tc.master_weights == "auto":
        return amp_dtype == torch.bfloat16
    return bool(tc.master_weights)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32 (no autocast)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def batch_rule(batch: int, lr: float, world: int, accum: int, parallel: str) -> str:
    """The global batch, how it is split, and the learning-rate rule (printed at the start)."""
    per = batch // (world * accum)
    how = "DDP" if parallel == "ddp" else "FSDP2"
    split = f"{world} {how} process(es) x {per} per micro-batch x {accum} accumulation step(s)"
    if world == 1:
        split = f"1 process x {per} per micro-batch x {accum} accumulation step(s)"
    return (
        f"global batch {batch} = {split}; lr {lr:.4g} is used as given (absolute): {lr * 256 / batch:.4g} "
        f"per 256 images. The recipes scale it linearly (lr = base_lr x global batch / 256): keep "
        f"lr / train.batch_size fixed when you change the batch; the number of GPUs and train.grad_accum "
        f"change neither, since train.batch_size is the global batch"
    )


def _micro_batch(batch: Any, i: int, n: int) -> Any:
    """The ``i``-th of ``n`` equal slices (along the first dimension) of a collated batch."""
    if n == 1:
        return batch
    if isinstance(batch, dict):
        return {k: _micro_batch(v, i, n) for k, v in batch.items()}
    if isinstance(batch, (Tensor, list, tuple)) and len(batch) % n == 0:
        m = len(batch) // n
        return batch[i * m : (i + 1) * m]
    raise ValueError(f"train.grad_accum={n}: cannot split a batch entry of type {type(batch).__name__}")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# ----------------------------------------------------------------------------- stop requests


class _StopRequests:
    """SIGTERM / first Ctrl-C ask for a clean stop after the current step (then save and exit).

    A second Ctrl-C interrupts at once. Handlers are installed only in the main thread and
    restored afterwards.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- run-dir guards


class NonFiniteLossError(ConfigError):
    """The loss became nan/inf; the run stopped without saving the diverged weights."""


def _open_run_dir(out_dir: Path, cfg: Config) -> ckpt.RunLock:
    """Rank 0, before any work: writable, locked, of this architecture, leftovers removed."""
    ckpt.check_writable(out_dir, "train.out_dir", directory=True)
    lock = ckpt.RunLock(out_dir).acquire()
    try:
        if cfg.train.resume:
            ckpt.check_run_architecture(out_dir, cfg.model.arch)
        ckpt.clean_stale_temporaries(out_dir)
        ckpt.atomic_write_text(out_dir / ckpt.CONFIG_FILE, dump_yaml(cfg))  # the run's record
    except BaseException:
        lock.release()
        raise
    return lock


def _check_tokenizer_ckpt(model: nn.Module, cfg: Config) -> None:
    """``model.tokenizer_ckpt`` must fit ``model.tokenizer``: checked from the file header, before
    any weight is read (a tokenizer of another kind would fail deep inside ``load_state_dict``)."""
    src = getattr(cfg.model, "tokenizer_ckpt", None)
    tok = getattr(model, "tokenizer", None)
    if not src or tok is None:
        return
    path = Path(src)
    if not path.exists():
        raise ConfigError(f"model.tokenizer_ckpt: {src!r} does not exist; expected a tokenizer checkpoint")
    if not path.is_dir():
        return  # an official file: the model's own loader maps its keys and checks them
    directory = ckpt.resolve_checkpoint_dir(path)
    want = getattr(getattr(cfg.model, "tokenizer", None), "arch", None)
    try:
        saved = ckpt.read_config(directory).model
        found = getattr(getattr(saved, "tokenizer", None), "arch", None) or saved.arch
    except ConfigError:
        found = None
    if want is not None and found is not None and found != want:
        raise ConfigError(
            f"model.tokenizer_ckpt: {src!r} holds a {found!r} tokenizer, but model.tokenizer.arch is "
            f"{want!r}; give a {want!r} checkpoint"
        )
    shapes = ckpt.tensor_shapes(directory / ckpt.MODEL_FILE)
    if any(k.startswith("tokenizer.") for k in shapes):  # a generator checkpoint: its tokenizer
        shapes = {k[len("tokenizer.") :]: v for k, v in shapes.items() if k.startswith("tokenizer.")}
    own = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    bad = [f"{k} (file {shapes[k]} vs model {own[k]})" for k in own if k in shapes and shapes[k] != own[k]]
    if bad or not set(own) & set(shapes):
        detail = f"{len(bad)} shape mismatch(es): {', '.join(bad[:3])}" if bad else "no common keys"
        raise ConfigError(
            f"model.tokenizer_ckpt: the weights in {src!r} do not fit model.tokenizer "
            f"({type(tok).__name__}, {detail}); check model.tokenizer.* against that checkpoint's config"
        )


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Holds the run's state; :meth:`run` trains. See :func:`train`."""

    def __init__(self, cfg: Config, dataset: Dataset | None = None) -> None:
        self.cfg = cfg
        tc = cfg.train
        sharded = tc.parallel == "fsdp2"
        self.dist = (
            D.init_distributed(cfg.device, need_group=True) if sharded else D.init_distributed(cfg.device)
        )
        self.device = self.dist.device
        from maskar.nn.attention import check_backend

        check_backend(cfg.attention_backend, self.device)
        if tc.batch_size % self.dist.world_size:
            raise ConfigError(
                f"train.batch_size: {tc.batch_size} is not divisible by the {self.dist.world_size} "
                f"processes; use a multiple of {self.dist.world_size}"
            )
        parts = self.dist.world_size * tc.grad_accum
        if tc.batch_size % parts:
            raise ConfigError(
                f"train.batch_size: {tc.batch_size} is not divisible by {self.dist.world_size} processes x "
                f"train.grad_accum {tc.grad_accum}; use a multiple of {parts}"
            )
        # Why the step runs eagerly (None: as one CUDA graph); the model may still add a reason.
        self.graph_off: str | None = "train.cuda_graph=false" if tc.cuda_graph is False else None
        if tc.cuda_graph is not False and (why := graph_refusal(tc, self.device, self.dist.world_size)):
            if tc.cuda_graph is True:
                raise ConfigError(f"train.cuda_graph: {why}")
            self.graph_off = f"train.cuda_graph=auto: {why}"
        elif tc.cuda_graph == "auto" and (tc.compile is True or tc.compile == "full"):
            # the whole step compiled and then captured was never tested on a GPU: only on request
            why = f"not with train.compile={tc.compile} (true captures it anyway)"
            self.graph_off = f"train.cuda_graph=auto: {why}"
        if tc.master_weights is True and self.graph_off is not None:
            raise ConfigError(f"train.master_weights: needs the step as one CUDA graph ({self.graph_off})")
        self.sharded = sharded
        self.out_dir = Path(tc.out_dir)
        self.lock: ckpt.RunLock | None = None
        problem: Exception | None = None
        if self.dist.is_main:
            try:
                self.lock = _open_run_dir(self.out_dir, cfg)
            except ConfigError as e:
                problem = e
        if D.any_rank(self.dist, problem is not None):  # every rank stops, not only rank 0
            raise problem or ConfigError(f"train.out_dir: rank 0 could not open {self.out_dir}")
        if self.lock is not None:
            weakref.finalize(self, self.lock.release)  # also when a Trainer is dropped unused
        try:
            self._build(cfg, dataset)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: Config, dataset: Dataset | None) -> None:
        tc = cfg.train
        self.log = RunLogger(self.out_dir, enabled=self.dist.is_main, tensorboard=tc.tensorboard)
        # The data first: a missing or bad dataset fails before the model is built.
        self.dataset = dataset if dataset is not None else self._build_dataset()

        # Same seed on every rank for construction (DDP also broadcasts rank 0's weights).
        D.seed_everything(tc.seed)
        from maskar.registry import build_model

        self.model = build_model(cfg.model)
        if self.graph_off is None and (problem := prepare_for_graph(self.model)) is not None:
            if tc.cuda_graph is True:
                raise ConfigError(f"train.cuda_graph: {problem}")
            self.graph_off = f"train.cuda_graph=auto: {problem}"
            if tc.master_weights is True:
                raise ConfigError(f"train.master_weights: needs the step as one CUDA graph ({problem})")
        resume_dir = ckpt.latest_checkpoint(self.out_dir) if tc.resume else None
        self.resume_dir = resume_dir
        verify = tc.verify_checkpoints
        if resume_dir is not None and ckpt.has_distributed_state(resume_dir):
            pass  # a sharded checkpoint: weights are read with the rest of the state, after sharding
        elif resume_dir is not None:
            weights = ckpt.load_tensors(resume_dir / ckpt.MODEL_FILE, verify=verify)
            ckpt.load_state_dict_checked(self.model, weights, f"resume from {resume_dir}")
        elif tc.init_from:
            src = ckpt.resolve_checkpoint_dir(tc.init_from)
            weights = ckpt.load_tensors(src / ckpt.MODEL_FILE, verify=verify)
            meta = ckpt.read_metadata(src / ckpt.MODEL_FILE)  # a shipped checkpoint may share its tokenizer
            weights.update(ckpt.shared_tokenizer_state(src, ckpt.read_config(src), meta))
            ckpt.load_state_dict_checked(self.model, weights, f"train.init_from={tc.init_from}")
        elif hasattr(self.model, "init_pretrained"):
            _check_tokenizer_ckpt(self.model, cfg)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.model.init_pretrained()  # e.g. a generator loads its frozen tokenizer
            for w in caught:  # re-issued under the caller's warning filters
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            random_tok = hasattr(self.model, "tokenizer") and getattr(cfg.model, "tokenizer_ckpt", 0) is None
            random_tok = random_tok and not getattr(self.model, "_tokenizer_from_stage1", False)
            if random_tok and not any("tokenizer_ckpt" in str(w.message) for w in caught):
                warnings.warn(
                    "model.tokenizer_ckpt is not set: the frozen tokenizer keeps its random "
                    "initialisation (fine for smoke tests, useless for real training)",
                    stacklevel=2,
                )
        self.model.to(self.device)
        from maskar.nn.attention import set_backend

        set_backend(self.model, cfg.attention_backend)

        main, disc = trainable_parameters(self.model)
        # Parameters no optimizer updates get no gradients (saves memory; DDP requires it).
        optimized = {id(p) for _, p in main + disc}
        for p in self.model.parameters():
            if id(p) not in optimized:
                p.requires_grad_(False)
        self.amp_dtype = autocast_dtype(tc.precision, self.device)

        # Transforms on the model itself (maskar.train.parallelize), in torchtitan's order:
        # activation checkpointing, compilation, then data parallelism (DDP or FSDP2).
        if tc.activation_checkpointing:
            P.apply_activation_checkpointing(self.model)
        self.compile_mode = P.resolve_compile_mode(tc.compile, self.model, self.device)
        mode = self.compile_mode
        compile_whole_call = mode != "none" and not P.apply_compile(
            self.model, mode, fullgraph=tc.compile != "auto"
        )
        flops = getattr(self.model, "train_flops_per_sample", None)
        self.flops_per_sample = float(flops()) if flops is not None else 0.0
        self.peak_tflops = P.peak_tflops(self.device, tc.peak_tflops)

        wrapped: nn.Module = _LossCall(self.model)
        if self.sharded:
            dtype = P.fsdp_param_dtype(tc.fsdp_param_dtype, self.amp_dtype)
            self.log.info(P.describe_fsdp(self.model, dtype, tc.fsdp_cpu_offload))
            wrapped = P.apply_fsdp(
                wrapped, self.model, self.dist, dtype, tc.fsdp_cpu_offload, tc.fsdp_reshard_after_forward
            )
            main, disc = trainable_parameters(self.model)  # the sharded (DTensor) parameters
        elif self.dist.distributed:
            find_unused = bool(getattr(self.model, "ddp_find_unused_parameters", bool(disc)))
            wrapped = P.apply_ddp(wrapped, self.dist, find_unused)
        if compile_whole_call:
            wrapped = torch.compile(wrapped)
        self.wrapped = wrapped

        self.main_params = [p for _, p in main]
        self.disc_params = [p for _, p in disc]
        self.optimizer = build_optimizer(main, self.model, cfg, tc.lr, self.device)
        self.disc_lr = tc.disc_lr if tc.disc_lr is not None else tc.lr
        self.disc_optimizer = (
            build_optimizer(disc, self.model, cfg, self.disc_lr, self.device) if disc else None
        )
        self.ema = EMA(main, tc.ema, tc.ema_warmup) if tc.ema > 0 else None
        self.scaler = (
            torch.amp.GradScaler(self.device.type, init_scale=2.0**11, growth_interval=1000)
            if tc.precision == "fp16"
            else None
        )

        self.sampler = D.EpochBatchSampler(
            len(self.dataset), tc.batch_size, self.dist.rank, self.dist.world_size, tc.seed
        )
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=D.seed_worker if cfg.data.num_workers > 0 else None,
            generator=self.loader_generator,
        )

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        # First step whose loss was not finite (-1: none); a device tensor, so no sync per step.
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        if resume_dir is not None:
            self._load_trainer_state(resume_dir)
        else:
            # Training randomness (augmentation, masking, noise) differs per rank.
            D.seed_everything(tc.seed + self.dist.rank)
        self.graph_step = None
        if self.graph_off is None:
            master = None
            if master_weights_on(tc, self.amp_dtype, graph=True):
                as_capturable(self.optimizer, self.device)  # the step reads device-tensor rates
                try:
                    master = MasterWeights(self.model, self.optimizer)
                except ValueError as e:  # auto steps aside for what the copies cannot step
                    why = str(e).removeprefix("master weights: ")
                    if tc.master_weights is True:
                        raise ConfigError(f"train.master_weights: {why}") from None
                    self.log.info(f"train.master_weights=auto: off ({why})")
            self.graph_step = GraphedStep(
                functools.partial(self.wrapped, fn="loss"),
                self.optimizer,
                self.main_params,
                tc.grad_clip,
                self._autocast,
                self.device,
                master=master,
            )

    def _build_dataset(self) -> Dataset:
        from maskar.data import build_dataset

        return build_dataset(self.cfg.data)

    # ----------------------------------------------------------------------------- state

    def trainer_state(self) -> dict[str, Any]:
        """Everything but the weights; gathers every rank's RNG state (call on all ranks).

        A sharded run keeps its optimizer tensors out of it (they go to the distributed
        checkpoint, see :meth:`_save_sharded`).
        """
        rng = D.all_gather_objects(self.dist, D.rng_state())
        whole = not self.sharded
        return {
            "format": 1 if whole else 2,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.dist.world_size,
            "optimizer": portable_state_dict(self.optimizer) if whole else None,
            "disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer and whole else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": {"decay": self.ema.decay, "num_updates": self.ema.num_updates} if self.ema else None,
            "rng": rng,
        }

    def _load_trainer_state(self, directory: Path) -> None:
        state = ckpt.load_trainer_state(directory, verify=self.cfg.train.verify_checkpoints)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        distributed = ckpt.has_distributed_state(directory)
        if distributed:
            self._load_sharded(directory, state)  # weights, EMA and optimizers, resharded to this run
        elif self.sharded:
            self._load_whole_optimizers_into_shards(directory, state)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.disc_optimizer is not None:
                if state.get("disc_optimizer") is None:
                    raise ckpt.CheckpointError(
                        f"resume from {directory}: it has no discriminator optimizer state"
                    )
                self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and not distributed:
            ema_file = directory / ckpt.EMA_FILE
            if ema_file.is_file():
                ema = ckpt.load_tensors(ema_file, self.device, verify=self.cfg.train.verify_checkpoints)
                self.ema.load_state_dict(ema)
                self.ema.num_updates = (state.get("ema") or {}).get("num_updates", 0)
            else:
                self.log.info(
                    f"resume: {directory} has no EMA weights; EMA restarts from the current weights"
                )
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            D.set_rng_state(rng[self.dist.rank])
        else:
            # Another world size: exact continuation is impossible anyway; reseed per rank and step.
            self.log.info(
                f"resume: saved with {len(rng)} ranks, running with {self.dist.world_size}; reseeding"
            )
            D.seed_everything(self.cfg.train.seed + 1000003 * self.step + self.dist.rank)
        if self.batch_in_epoch >= self.sampler.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.log.info(
            f"resumed from {directory} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})"
        )

    # ----------------------------------------------------------------------------- sharded state

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"optimizer": self.optimizer}
        if self.disc_optimizer is not None:
            opts["disc_optimizer"] = self.disc_optimizer
        return opts

    def _state_by_name(self) -> tuple[dict[str, Any], dict[str, list]]:
        """(tensors, optimizer hyper-parameters) keyed by parameter names, whatever the sharding.

        Tensors are this rank's shards (DTensors) in a sharded run and whole tensors otherwise,
        the very tensors of the run (loading into them updates it in place).
        """
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        tensors: dict[str, Any] = {"model": get_model_state_dict(self.model)}
        groups = {}
        for name, opt in self._optimizers().items():
            # A fresh optimizer gets zero moments first (a step with lr 0), which loading overwrites.
            osd = get_optimizer_state_dict(self.model, opt)
            tensors[name], groups[name] = osd["state"], osd["param_groups"]
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        return tensors, groups

    def _save_sharded(self, state: dict[str, Any]) -> Path:
        """Step checkpoint of a sharded run: ``dcp/`` (every rank writes its shards of the weights,
        EMA and optimizer state) plus, from rank 0, the gathered weights as safetensors (for
        sampling and evaluation), the trainer state and the SHA-256 of every file."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        main = self.dist.is_main
        tmp = ckpt.begin_step_checkpoint(self.out_dir, self.step) if main else None
        tmp = Path(D.broadcast_from_main(self.dist, str(tmp) if main else None))
        try:
            tensors, groups = self._state_by_name()
            state["optimizer_groups"] = groups
            ckpt.save_distributed(tmp, tensors)
            D.barrier(self.dist)
            names = ckpt.distributed_files(tmp)
            mine = {n: ckpt.sha256_file(tmp / n) for n in names[self.dist.rank :: self.dist.world_size]}
            digests = {k: v for d in D.all_gather_objects(self.dist, mine) for k, v in d.items()}
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 only, in CPU memory
            weights = get_model_state_dict(self.model, options=options)
            ema = None
            if self.ema is not None:
                ema = {}
                for k, v in self.ema.state_dict().items():
                    whole = D.full_tensor(v)  # every rank takes part in the gather
                    if main:
                        ema[k] = whole.cpu()
            path = self.out_dir / ckpt.step_dir_name(self.step)
            if main:
                ckpt.save_model(tmp, self.model, self.cfg, ema, model_state=weights)
                ckpt.save_trainer_state(tmp, state)
                ckpt.update_checksums(tmp, digests)
                path = ckpt.commit_step_checkpoint(self.out_dir, self.step, tmp, self.cfg.train.keep_last)
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _verify_sharded(self, directory: Path) -> None:
        """Check the ``dcp/`` files against SHA256SUMS, each rank a share of them."""
        if not self.cfg.train.verify_checkpoints:
            return
        problem: Exception | None = None
        try:
            names = ckpt.distributed_files(directory)
            for name in names[self.dist.rank :: self.dist.world_size]:
                ckpt.verify_file(directory, name)
        except ckpt.CheckpointError as e:
            problem = e
        if D.any_rank(self.dist, problem is not None):
            raise problem or ckpt.CheckpointError(
                f"resume from {directory}: another rank found a {ckpt.DCP_DIR}/ file that does not match "
                f"{ckpt.SUMS_FILE} (train.verify_checkpoints=false skips this check)"
            )

    def _load_sharded(self, directory: Path, state: dict[str, Any]) -> None:
        """Weights, EMA and optimizer state from ``dcp/``, laid out for this run (any world size)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        context = f"resume from {directory}"
        self._verify_sharded(directory)
        meta = ckpt.read_distributed_metadata(directory)
        tensors, groups = self._state_by_name()
        saved_groups = state.get("optimizer_groups") or {}
        for name in groups:
            if name not in saved_groups:
                raise ckpt.CheckpointError(f"{context}: it has no {name.replace('_', ' ')} state")
        if "ema" in tensors and not any(k.startswith("ema.") for k in meta.state_dict_metadata):
            self.log.info(f"resume: {directory} has no EMA weights; EMA restarts from the current weights")
            del tensors["ema"]
        for part, expected in tensors.items():
            ckpt.check_distributed_state(meta, part, expected, context)
        ckpt.load_distributed(directory, tensors)
        set_model_state_dict(self.model, tensors["model"])
        for name, opt in self._optimizers().items():
            # The saved hyper-parameters, with this run's implementation flags (fused, foreach).
            impl = ("fused", "foreach", "capturable", "differentiable")
            merged = [
                {**saved, **{k: now[k] for k in impl if k in now}, "params": now["params"]}
                for saved, now in zip(saved_groups[name], groups[name], strict=True)
            ]
            set_optimizer_state_dict(self.model, opt, {"state": tensors[name], "param_groups": merged})
        if "ema" in tensors:
            self.ema.num_updates = (state.get("ema") or {}).get("num_updates", 0)

    def _load_whole_optimizers_into_shards(self, directory: Path, state: dict[str, Any]) -> None:
        """A sharded run resuming from an unsharded checkpoint: each rank keeps its shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(p): n for n, p in self.model.named_parameters()}
        for key, opt in self._optimizers().items():
            saved = state.get(key)
            if saved is None:
                raise ckpt.CheckpointError(
                    f"resume from {directory}: it has no {key.replace('_', ' ')} state"
                )
            # torch numbers parameters in the order of the groups; map the numbers to names.
            order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
            by_name = {
                "state": {order[i]: s for i, s in saved["state"].items()},
                "param_groups": [
                    {**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]
                ],
            }
            set_optimizer_state_dict(self.model, opt, by_name, options=StateDictOptions(full_state_dict=True))

    def check_finite_loss(self) -> None:
        """Raise :class:`NonFiniteLossError` if any rank saw a nan/inf loss (all ranks call)."""
        bad = int(self._bad_step.item())
        if not D.any_rank(self.dist, bad >= 0):
            return
        last = ckpt.latest_checkpoint(self.out_dir)
        where = f"at step {bad}" if bad >= 0 else "on another rank"
        kept = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was saved"
        raise NonFiniteLossError(
            f"train: the loss became nan/inf {where}; stopped without saving the diverged weights, "
            f"{kept}. Lower train.lr, set train.grad_clip, or check the data"
        )

    def save(self) -> Path:
        """Write ``out_dir/step-XXXXXXX`` (all ranks call; rank 0 writes, and in a sharded run
        every rank writes its shards); never diverged weights."""
        self.check_finite_loss()
        state = self.trainer_state()
        path = self.out_dir / ckpt.step_dir_name(self.step)
        if self.sharded:
            path = self._save_sharded(state)
        elif self.dist.is_main:
            path = ckpt.save_step_checkpoint(
                self.out_dir,
                self.step,
                self.model,
                self.cfg,
                trainer_state=state,
                ema_state=self.ema.state_dict() if self.ema else None,
                keep_last=self.cfg.train.keep_last,
            )
        D.barrier(self.dist)
        self._last_saved = self.step
        self.log.info(f"saved {path}")
        return path

    # ----------------------------------------------------------------------------- one step

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _no_sync(self, skip: bool):
        """DDP: no gradient all-reduce for this micro-batch (the last one reduces the sum).

        FSDP2 reduce-scatters every micro-batch: gradients then stay sharded between them,
        which is what a model too big for one GPU needs.
        """
        ddp = getattr(self.wrapped, "_orig_mod", self.wrapped)
        if skip and isinstance(ddp, nn.parallel.DistributedDataParallel):
            return ddp.no_sync()
        return contextlib.nullcontext()

    def _forward_backward(self, batch: dict[str, Tensor], fn: str) -> dict[str, Tensor]:
        """``fn``'s loss and gradients over ``train.grad_accum`` equal micro-batches of ``batch``.

        Each micro-batch's loss is divided by their number, so the gradient is that of the mean
        loss over the whole batch (for losses that average over samples). Returns the mean of
        the micro-batches' outputs, detached.
        """
        n = self.cfg.train.grad_accum
        sums: dict[str, Tensor] = {}
        for i in range(n):
            part = _micro_batch(batch, i, n)
            with self._no_sync(i < n - 1):
                with self._autocast():
                    out = self.wrapped(part, fn)
                loss = out["loss"] if n == 1 else out["loss"] / n
                if fn == "loss":
                    first = (self._bad_step < 0) & ~torch.isfinite(out["loss"].detach())
                    self._bad_step = torch.where(first, self.step + 1, self._bad_step)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            for k, v in out.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v
        return sums if n == 1 else {k: v / n for k, v in sums.items()}

    def _clip_and_step(
        self, optimizer: torch.optim.Optimizer, params: list[Tensor], want_norm: bool
    ) -> Tensor | None:
        clip = self.cfg.train.grad_clip
        norm = None
        if self.scaler is None and not self.sharded:
            if clip > 0 or want_norm:
                # the clipping inside fused AdamW's pass where it can (maskar.train.clipping)
                norm = clip_and_step(optimizer, params, clip)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return norm
        if self.scaler is not None and (clip > 0 or want_norm):
            self.scaler.unscale_(optimizer)
        if self.sharded and (clip > 0 or want_norm):
            norm = D.clip_grad_norm(params, clip, self.dist)  # sharded gradients, maybe in CPU memory
        elif clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        elif want_norm:
            norm = total_norm(params, self.device)
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def train_step(self, batch: dict[str, Tensor], want_norm: bool = False) -> dict[str, Tensor]:
        """One optimizer step (plus the discriminator step if any). Returns detached metrics."""
        tc = self.cfg.train
        lr = lr_from_config(self.step, tc)
        scale = lr / tc.lr if tc.lr > 0 else 0.0
        set_lr(self.optimizer, lr)
        batch = _to_device(batch, self.device)
        metrics: dict[str, Tensor] = {}

        if self.graph_step is not None:
            out, norm = self.graph_step(batch)
            first = (self._bad_step < 0) & ~torch.isfinite(out["loss"])
            self._bad_step = torch.where(first, self.step + 1, self._bad_step)
            metrics.update(out)
            norm = norm if want_norm or tc.grad_clip > 0 else None
        else:
            metrics.update(self._forward_backward(batch, "loss"))
            norm = self._clip_and_step(self.optimizer, self.main_params, want_norm)
        if norm is not None:
            metrics["grad_norm"] = norm.detach().float()

        if self.disc_optimizer is not None:
            for g in self.disc_optimizer.param_groups:
                g["lr"] = self.disc_lr * scale
            self.disc_optimizer.zero_grad(set_to_none=True)  # drop grads the generator loss left
            dout = self._forward_backward(batch, "disc_loss")
            dnorm = self._clip_and_step(self.disc_optimizer, self.disc_params, want_norm)
            metrics.update({f"disc_{k}": v for k, v in dout.items()})
            if dnorm is not None:
                metrics["disc_grad_norm"] = dnorm.detach().float()
            self.optimizer.zero_grad(set_to_none=True)  # the disc loss may reach generator params
        if self.scaler is not None:
            self.scaler.update()
            metrics["loss_scale"] = torch.tensor(float(self.scaler.get_scale()))
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        self.batch_in_epoch += 1
        if hasattr(self.model, "on_train_step_end"):
            extra = self.model.on_train_step_end(self.step)
            for k, v in (extra or {}).items():
                metrics[k] = v.detach().float() if isinstance(v, Tensor) else torch.tensor(float(v))
        metrics["lr"] = torch.tensor(lr)
        return metrics

    # ----------------------------------------------------------------------------- loop

    def _batches(self):
        """Batches from the current data position on, across epochs, forever."""
        while True:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            # Worker seeds (augmentation with num_workers > 0) depend only on (seed, epoch, rank).
            self.loader_generator.manual_seed(D.mix_seed(self.cfg.train.seed, self.epoch, self.dist.rank))
            yield from D.iter_with_workers_shielded(self.loader)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _log_metrics(
        self, sums: dict[str, Tensor], counts: dict[str, int], window_start: float, steps: int
    ) -> dict[str, float]:
        keys = sorted(sums)
        avg = torch.stack([(sums[k] / counts[k]).to(self.device) for k in keys]) if keys else None
        if avg is not None:
            avg = D.mean_over_ranks(self.dist, avg).tolist()  # one sync for all metrics
        # The window's time is read after the sync: the host may have queued steps the GPU has not
        # run yet (one replay per step with train.cuda_graph, so many), and they belong to it.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - window_start
        values = dict(zip(keys, avg or []))
        order = ["loss"] + [k for k in keys if k not in ("loss", "lr", "grad_norm")] + ["lr", "grad_norm"]
        out = {k: values[k] for k in order if k in values}
        rate = steps / elapsed if elapsed > 0 else float("nan")
        out["it_per_s"] = rate
        out["samples_per_s"] = rate * self.cfg.train.batch_size
        out["step_ms"] = 1e3 / rate if rate > 0 else float("nan")
        per_gpu = rate * self.cfg.train.batch_size / self.dist.world_size
        util = P.mfu(self.flops_per_sample, per_gpu, self.peak_tflops)
        if util is not None:
            out["mfu"] = util
        out["max_mem_gb"] = max_memory_gb(self.device)
        self.log.scalars(self.step, self.cfg.train.steps, out)
        self.check_finite_loss()
        return out

    def step_mode(self) -> str:
        """How each step runs, for the log: a comparison of two runs' losses or speeds names it."""
        compiled = f"train.compile={self.compile_mode}"
        if self.graph_step is None:
            return f"{compiled}, eager launches ({self.graph_off})"
        master = self.graph_step.master is not None
        weights = "bf16 copies of the linears, fp32 masters" if master else "autocast"
        return f"{compiled}, one CUDA graph (train.cuda_graph), {weights}"

    def run(self, stop_at: int | None = None) -> Path:
        """Train to ``train.steps`` (or stop early at ``stop_at``, saving, as an interruption would)."""
        tc = self.cfg.train
        total = tc.steps if stop_at is None else min(stop_at, tc.steps)
        if self.dist.is_main:
            if self.log.tb_error:
                self.log.info(self.log.tb_error)
            n_main = sum(p.numel() for p in self.main_params)
            self.log.info(
                f"training {self.cfg.model.arch} ({n_main / 1e6:.2f}M trained parameters) on "
                f"{self.dist.world_size} x {self.device.type}, batch {tc.batch_size}, "
                f"{len(self.dataset)} samples, {self.sampler.batches_per_epoch} steps/epoch, "
                f"precision {tc.precision}, out_dir {self.out_dir}"
            )
            self.log.info(batch_rule(tc.batch_size, tc.lr, self.dist.world_size, tc.grad_accum, tc.parallel))
            self.log.info(f"step: {self.step_mode()}")
        self._last_saved = self.step if self.resume_dir is not None else -1
        if not tc.resume and ckpt.latest_checkpoint(self.out_dir) is not None:
            self.log.info(
                f"train.resume=false: starting from scratch; the checkpoints already in {self.out_dir} "
                "will be replaced as this run saves"
            )
        if self.step >= total:
            self.log.info(f"nothing to do: already at step {self.step} of {total}")
            self.log.close()
            self.close()
            return self.out_dir

        if hasattr(self.model, "on_train_start"):
            self.model.on_train_start(self.step)  # 0 on a fresh run, the restored step on resume
        bar = None
        if self.dist.is_main and tc.progress:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, dynamic_ncols=True, desc="train")
            self.log.set_console(bar.write)
        self.wrapped.train()
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        window_start, window_steps = time.perf_counter(), 0
        stop_signal = None
        try:
            with _StopRequests() as stops:
                batches = self._batches()
                while self.step < total:
                    batch = next(batches)
                    want_norm = (self.step + 1) % tc.log_every == 0
                    metrics = self.train_step(batch, want_norm=want_norm)
                    for k, v in metrics.items():
                        sums[k] = sums[k] + v if k in sums else v
                        counts[k] = counts.get(k, 0) + 1
                    window_steps += 1
                    if bar is not None:
                        bar.update(1)
                    if self.step % tc.log_every == 0:
                        logged = self._log_metrics(sums, counts, window_start, window_steps)
                        if bar is not None and "loss" in logged:
                            bar.set_postfix(loss=f"{logged['loss']:.4g}", refresh=False)
                        sums, counts = {}, {}
                        window_start, window_steps = time.perf_counter(), 0
                    stop = D.any_rank(self.dist, stops.signal is not None)
                    if (tc.ckpt_every and self.step % tc.ckpt_every == 0) or stop:
                        self.save()
                    if stop:
                        stop_signal = stops.signal if stops.signal is not None else signal.SIGTERM
                        break
            if self._last_saved != self.step:
                self.save()
        finally:
            if bar is not None:
                bar.close()
            self.log.close()
            self.close()
        if stop_signal is not None:
            if self.dist.is_main:
                name = signal.Signals(stop_signal).name
                print(f"stopped by {name} at step {self.step}; checkpoint saved in {self.out_dir}")
            if stop_signal == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + int(stop_signal))
        return self.out_dir

    def close(self) -> None:
        """Release the run directory's lock (run() does this when it ends)."""
        if self.lock is not None:
            self.lock.release()


def train(cfg: Config, dataset: Dataset | None = None, stop_at: int | None = None) -> Path:
    """Train ``cfg`` (see the module docstring); returns ``cfg.train.out_dir``.

    ``dataset`` replaces ``build_dataset(cfg.data)`` (tests, custom data). ``stop_at`` stops
    after that many steps with a checkpoint, as an interruption would; a later call with
    ``train.resume=true`` continues exactly.
    """
    trainer = None
    try:
        trainer = Trainer(cfg, dataset)
        return trainer.run(stop_at=stop_at)
    finally:
        if trainer is not None:
            trainer.close()
        D.shutdown_distributed()
