"""The whole training step (loss, backward, clipping, AdamW) captured once as a CUDA graph.

A replay launches every kernel of the step with one host call, so the GPU never waits for the
host between kernels: the compiled blocks' launches, the attention kernels' launches and the
optimizer's Python all leave the step. On one H200 a VAR-d16 256 px B 32 step timed alone goes
from 93.8 to 75.9 ms; in `maskar train`'s loop, which already launches each step while the GPU
runs the previous one, from 78.1 to 77.2 ms (docs/benchmarks.md, *Training step*, run 5).

What a graph needs and how this meets it:

- static inputs: each step's batch is copied into buffers allocated at capture; every batch must
  have the capture's shapes and dtypes (the trainer's sampler drops the ragged tail);
- static outputs: the loss outputs and the gradient norm live in the graph's pool and are
  overwritten by the next replay, so the step returns copies;
- the gradients are the graph's own buffers: backward writes them (they were None at capture),
  it never accumulates, so no ``zero_grad`` runs between replays;
- the learning rate is read from the GPU: each group's ``lr`` becomes a device tensor that the
  host fills before a replay, and AdamW runs ``capturable`` (its step count on the GPU too);
- random draws on the GPU (label dropout, drop path) stay random: PyTorch's CUDA generator
  advances its Philox offset at every replay. Draws on the host would be frozen at their
  captured values, so a model makes its step graph-safe or says why it cannot
  (``prepare_graph_step()``, None when it is);
- the first ``warmup`` steps run eagerly on a side stream (compilation, autotuning and lazy
  initialisation stay out of the capture); they are real training steps;
- with ``master`` (:class:`maskar.train.master_weights.MasterWeights`, ``train.master_weights``)
  the linears compute with bf16 copies that the AdamW pass writes; the pass reads its gradients'
  addresses from a table, filled after the capture from the graph pool's gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from maskar.train.clipping import clip_and_step
from maskar.train.master_weights import MasterWeights

WARMUP_STEPS = 3


def prepare_for_graph(model: torch.nn.Module) -> str | None:
    """Make ``model``'s training step fit one CUDA graph (its ``prepare_graph_step()``, e.g.
    HMAR stage 2 moves its mask-ratio draw to the GPU); return why it cannot, or None."""
    prepare = getattr(model, "prepare_graph_step", None)
    if prepare is None:
        return f"{type(model).__name__} does not declare its training step graph-safe"
    return prepare()


def as_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Groups' ``lr`` as device tensors and ``capturable`` on, so a graph reads the rate the
    host sets before each replay (also after a resume loaded float rates into the groups)."""
    for g in optimizer.param_groups:
        if not isinstance(g["lr"], Tensor):
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)
        g["capturable"] = True


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate: in place where it is a device tensor (no host sync)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def portable_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with float rates and ``capturable`` off: what an eager run
    saves, so a checkpoint does not depend on how the run stepped."""
    sd = optimizer.state_dict()
    for g in sd["param_groups"]:
        if isinstance(g.get("lr"), Tensor):
            g["lr"] = float(g["lr"])
        if "capturable" in g:
            g["capturable"] = False
    return sd


class GraphedStep:
    """Call with a batch (a dict of device tensors): runs one training step, eagerly for the
    first ``warmup`` calls, then captured once and replayed. Returns (loss outputs, gradient
    norm), both fresh tensors."""

    def __init__(
        self,
        loss_fn: Callable[[dict[str, Tensor]], dict[str, Tensor]],
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        grad_clip: float,
        autocast: Callable[[], contextlib.AbstractContextManager],
        device: torch.device,
        warmup: int = WARMUP_STEPS,
        master: MasterWeights | None = None,
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph step needs a CUDA device, got {device}")
        self.loss_fn, self.optimizer, self.params = loss_fn, optimizer, params
        self.grad_clip, self.autocast, self.device = grad_clip, autocast, device
        self.warmup, self.master = warmup, master
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: dict[str, Tensor] = {}
        self.static_out: dict[str, Tensor] = {}
        self.static_norm: Tensor | None = None
        as_capturable(optimizer, device)

    def _body(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        master = self.master
        with master.swapped() if master is not None else contextlib.nullcontext():
            with self.autocast():
                out = self.loss_fn(batch)
            out["loss"].backward()
        if master is not None:
            norm = master.step(self.grad_clip)
        else:
            norm = clip_and_step(self.optimizer, self.params, self.grad_clip)
        return {k: v.detach().float() for k, v in out.items()}, norm.detach().float()

    def _zero_grad(self) -> None:
        if self.master is not None:
            self.master.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _eager(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._zero_grad()
            out, norm = self._body(batch)
        main.wait_stream(side)
        self.eager_steps += 1
        return {k: v.clone() for k, v in out.items()}, norm.clone()

    def _capture(self, batch: dict[str, Tensor]) -> None:
        self.static_batch = {k: v.clone() for k, v in batch.items()}
        self._zero_grad()  # backward then allocates the gradients in the pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pin-memory thread keeps working during the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_out, self.static_norm = self._body(self.static_batch)
        if self.master is not None:
            self.master.fill_pending()  # the pool's gradient addresses, for the replays
        self.graph = graph

    def _load(self, batch: dict[str, Tensor]) -> None:
        if batch.keys() != self.static_batch.keys():
            raise ValueError(
                f"train.cuda_graph: batch keys {sorted(batch)} differ from the captured "
                f"{sorted(self.static_batch)} (train.cuda_graph=false launches the step eagerly)"
            )
        for k, v in batch.items():
            s = self.static_batch[k]
            if v.shape != s.shape or v.dtype != s.dtype:
                raise ValueError(
                    f"train.cuda_graph: batch[{k!r}] is {tuple(v.shape)} {v.dtype}, the graph was "
                    f"captured for {tuple(s.shape)} {s.dtype}; every batch must have one shape "
                    "(train.cuda_graph=false launches the step eagerly)"
                )
            s.copy_(v, non_blocking=True)

    def __call__(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        bad = [k for k, v in batch.items() if not (isinstance(v, Tensor) and v.device.type == "cuda")]
        if bad:
            raise ValueError(f"train.cuda_graph: batch entries {bad} are not CUDA tensors")
        if self.graph is None and self.eager_steps < self.warmup:
            return self._eager(batch)
        if self.graph is None:
            self._capture(batch)  # records only: the replay below runs this step
        else:
            self._load(batch)
        self.graph.replay()
        assert self.static_norm is not None
        return {k: v.clone() for k, v in self.static_out.items()}, self.static_norm.clone()
