"""The fast training step of a stacked ensemble: one batched forward, the fused per-member
cross-entropy, one fused optimizer step over the stacked parameters, no host synchronisation.

    model = build_model("mlp", (1, 28, 28), 10, members=16)
    opt = make_optimizer(model.parameters(), lr=1e-3)
    step = make_train_step(model, opt)             # cuda_graph=True on a GPU replays one graph
    for xb, yb in batches:                         # xb (S, B, C, H, W) or shared (B, C, H, W)
        loss = step(xb, yb)                        # a device scalar: no .item() in the loop

What the profile of the plain loop showed, and what this module removes (docs/benchmarks.md):

* the optimizer: ``torch.optim.Adam``'s default (per-tensor ``for`` loop on CPU) and
  ``foreach=True`` (slower than the loop on CPU: it materialises intermediates) both make several
  passes over params/grads/moments; ``fused=True`` makes one. On 2 CPU cores it is 2.6× faster
  than the default and 3.9× faster than foreach for the S=16 MLP; on CUDA it is one kernel.
* the loss: one fused ``ensemble_cross_entropy`` (softmax, NLL and gradient in one pass) instead
  of S ``F.cross_entropy`` calls or a reshape + repeat + mean composite.
* gradients: ``zero_grad(set_to_none=True)`` (no memset); backward writes fresh ``.grad``.
* page faults on CPU: glibc returns every freed block above 32 MB to the kernel (``munmap``) and
  faults it back in, zero-filled, at the next allocation: with S = 64 members each step's
  gradients (137 MB for the MLP) cost ~27,000 page faults, 30 ms of a 79 ms step.
  :func:`retain_freed_cpu_memory` (called by :func:`make_train_step` and ``Method.fit`` on CPU) keeps
  freed blocks in the process instead.
* host syncs: the step returns the loss as a 0-d device tensor; read it (``float(loss)``) only
  when you log.
* launch overhead on GPU: ``cuda_graph=True`` captures forward, backward and the optimizer step
  as one CUDA graph and replays it (static input buffers; the Adam state made capturable).

Precision. ``precision="bf16"`` runs the forward under ``torch.autocast(dtype=torch.bfloat16)``:
the stacked ops (``ensemble_linear``, ``bayes_linear``) and the convolutions compute in bfloat16
with float32 accumulation (AMX / AVX512-BF16 on CPUs that have them, tensor cores on GPUs; on a
CPU without bf16 arithmetic the measured dispatch multiplies the bf16 values as float32, and a
one-time warning says bf16 is slower than fp32 there), the
weights stay float32 (the master copy) and so do the optimizer state and step, and the loss is
computed in float32 from float32-cast logits (:func:`ensemble_loss`). On the CPU with the fused
Adam of :func:`make_optimizer`, the step keeps a bfloat16 copy of each weight that the Adam update
writes (:mod:`faststeal.master_weights`): no cast of the weights in the forward or of their
gradients in the backward, the same bits. ``Method.fit`` trains with this same step
(:class:`TrainStep`), so the benchmarked step is the one that runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import warnings
from typing import Callable, ContextManager, Iterable, Optional

import torch
from torch import Tensor, nn

from . import master_weights
from .checks import env_off
from .master_weights import MasterWeights

__all__ = ["PRECISIONS", "autocast", "check_precision", "ensemble_loss", "make_optimizer",
           "make_train_step", "retain_disabled_reason", "retain_freed_cpu_memory", "TrainStep"]

#: Training/prediction precisions: the compute dtype of the stacked layers (None: float32).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def check_precision(precision: object) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ValueError naming the choices."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(device_type: str, precision: str) -> ContextManager:
    """The context a forward pass of ``precision`` runs in: ``torch.autocast`` for bf16, else
    nothing."""
    dtype = PRECISIONS[check_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_RETAIN_ENV = "FASTSTEAL_RETAIN_CPU_MEMORY"
_retained: Optional[bool] = None


def retain_disabled_reason() -> Optional[str]:
    """Why :func:`retain_freed_cpu_memory` does nothing in this process, or None."""
    if env_off(_RETAIN_ENV):
        return f"{_RETAIN_ENV}={os.environ[_RETAIN_ENV]}"
    if not sys.platform.startswith("linux"):
        return f"not Linux/glibc ({sys.platform})"
    return None


def retain_freed_cpu_memory(max_block_bytes: int = 2**31 - 1) -> bool:
    """Make glibc serve CPU blocks of up to ``max_block_bytes`` from its heap and never trim the
    heap, so that large stacked tensors freed every step (gradients, activations) are reused
    instead of being unmapped and page-faulted back in (glibc's default ``mmap``s every block
    above its dynamic threshold of at most 32 MB). Process-wide and once per process; returns
    whether it is in effect. A no-op off Linux/glibc, and when ``FASTSTEAL_RETAIN_CPU_MEMORY=0``.

    Cost: the process keeps its peak heap (RSS does not shrink after a large step; the memory is
    reused by the next allocations, not leaked). Measured on 2 cores: S = 64 MLP step at batch
    32 79 -> 50 ms; no change where every stacked tensor is below 32 MB (S = 16 MLP, batch 32).
    """
    global _retained
    if _retained is not None:
        return _retained
    if (not isinstance(max_block_bytes, int) or isinstance(max_block_bytes, bool)
            or max_block_bytes <= 0):
        raise ValueError(f"max_block_bytes must be a positive int, got {max_block_bytes!r}")
    _retained = False
    if retain_disabled_reason() is not None:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # both: with a high mmap threshold alone the heap top is still trimmed (unmapped) on frees
    # (a 1 GiB trim threshold still faulted 95,000 pages per lenet S=16 B=1024 step); -1 turns
    # trimming off (mallopt(3))
    _retained = (bool(mallopt(_M_MMAP_THRESHOLD, min(max_block_bytes, 2**31 - 1)))
                 and bool(mallopt(_M_TRIM_THRESHOLD, -1)))
    return _retained


def ensemble_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Scalar loss: the sum over members of each member's mean cross-entropy.

    logits: (S, B, C). target: shared by the members — (B,) labels or (B, C) probabilities — or
    one per member — (S, B) labels or (S, B, C) probabilities (independently shuffled members).
    Per-member targets run as one (1, S*B, C) problem whose mean is (1/S) sum_s loss_s, so S
    times it is the sum and every member still gets only its own gradient. bfloat16/float16
    logits (mixed precision) are cast to float32 first: the loss is always float32.
    """
    from . import ops

    if isinstance(logits, Tensor) and logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    if logits.dim() != 3:
        raise ValueError(f"logits must be (members, batch, classes), got shape "
                         f"{tuple(logits.shape)}")
    s, b, c = logits.shape
    hard = not target.dtype.is_floating_point
    if target.dim() == (1 if hard else 2):
        return ops.ensemble_cross_entropy(logits, target).sum()
    if tuple(target.shape[:2]) != (s, b):
        raise ValueError(f"per-member target must start with (members, batch) = {(s, b)}, got "
                         f"shape {tuple(target.shape)}")
    flat = target.reshape(s * b) if hard else target.reshape(s * b, c)
    return ops.ensemble_cross_entropy(logits.reshape(1, s * b, c), flat)[0] * s


def make_optimizer(params: Iterable[Tensor], lr: float = 1e-3, *, kind: str = "adam",
                   capturable: bool = False, **kw) -> torch.optim.Optimizer:
    """One Adam/AdamW/SGD over all stacked parameters, ``fused=True`` where torch supports it.

    Fused kernels exist for CUDA and (torch >= 2.4) CPU; otherwise this falls back to
    ``foreach=True`` and then to the default implementation. ``capturable=True`` keeps the step
    counters on the device (required for CUDA-graph capture).
    """
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if kind not in classes:
        raise ValueError(f"kind must be one of {tuple(classes)}, got {kind!r}")
    cls = classes[kind]
    params = list(params)
    if capturable and kind != "sgd":
        kw["capturable"] = True
    for extra in ({"fused": True}, {"foreach": True}, {}):
        try:
            return cls(params, lr=lr, **extra, **kw)
        except (RuntimeError, TypeError, ValueError):  # fused unsupported for the device/dtype
            continue
    raise RuntimeError("unreachable")  # pragma: no cover


def _has_host_seeded_randomness(model: nn.Module) -> Optional[str]:
    """A module that draws its fused-op seed on the host each call (frozen by graph capture)."""
    from .nn import BayesConv2d, BayesLinear, EnsembleLinear

    for name, m in model.named_modules():
        if isinstance(m, (BayesLinear, BayesConv2d)):
            return f"{name or 'model'} ({type(m).__name__}) samples weights"
        if isinstance(m, EnsembleLinear) and m.dropout > 0 and m.training:
            return f"{name or 'model'} (EnsembleLinear) has fused dropout p={m.dropout}"
    return None


_warned_no_bf16 = False


def _warn_if_no_cpu_bf16() -> None:
    """Once per process: bf16 on a CPU without bfloat16 arithmetic is slower than float32."""
    global _warned_no_bf16
    from .ops.cpp_backend import onednn_multiplies

    if _warned_no_bf16 or onednn_multiplies(torch.bfloat16):
        return
    _warned_no_bf16 = True
    warnings.warn("faststeal: this CPU has no bfloat16 arithmetic (oneDNN reports no "
                  "AVX512-BF16/AMX), so precision='bf16' is slower than precision='fp32' here: "
                  "its bf16 products are emulated (ATen's fallback GEMMs, or float32 products "
                  "of the bf16 values where measured faster and by default without tuning; "
                  "docs/benchmarks.md)", RuntimeWarning, stacklevel=3)


class TrainStep:
    """A callable ``step(x, y) -> loss``: a detached 0-d device tensor (see
    :func:`make_train_step`).

    ``compute_loss(x, y) -> scalar`` replaces ``loss_fn(model(x), y)`` when a method's loss has
    more than the member cross-entropy (Bayes by Backprop's KL term). ``precision``: ``"fp32"``
    or ``"bf16"`` (the forward runs under :func:`autocast`; see the module docstring).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = ensemble_loss,
                 cuda_graph: bool = False, warmup: int = 3, *,
                 compute_loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 precision: str = "fp32") -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.compute_loss = compute_loss
        self.precision = check_precision(precision)
        p = next(model.parameters(), None)
        self.device_type = p.device.type if p is not None else "cpu"
        self.cuda_graph = bool(cuda_graph)
        self.warmup = int(warmup)
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._static: Optional[tuple[Tensor, Tensor, Tensor]] = None
        # bf16 on the CPU: the Adam step writes the weights' bfloat16 copies (no cast passes)
        self.master_weights: Optional[MasterWeights] = None
        if (self.precision == "bf16" and not self.cuda_graph and self.device_type == "cpu"
                and master_weights.disabled_reason(optimizer) is None):
            self.master_weights = MasterWeights(optimizer)
        if self.precision == "bf16" and self.device_type == "cpu":
            _warn_if_no_cpu_bf16()  # (stacklevel: the caller that built the step)
        if self.cuda_graph:
            p = next(model.parameters())
            if p.device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on "
                                 f"{p.device}")
            why = _has_host_seeded_randomness(model)
            if why is not None:
                raise ValueError(f"cuda_graph=True would replay one fixed random seed: {why}. "
                                 f"Use cuda_graph=False for stochastic layers.")
            for g in optimizer.param_groups:
                if "capturable" in g:
                    g["capturable"] = True

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        with autocast(self.device_type, self.precision):
            if self.compute_loss is not None:
                return self.compute_loss(x, y)
            return self.loss_fn(self.model(x), y)

    def _eager(self, x: Tensor, y: Tensor) -> Tensor:
        mw = self.master_weights
        with mw.active() if mw is not None else contextlib.nullcontext():
            loss = self._loss(x, y)
        loss.backward()
        (mw or self.optimizer).step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _capture(self, x: Tensor, y: Tensor) -> None:
        # Warm up on a side stream (cuBLAS/Triton autotuning, lazy optimizer state), then undo the
        # warm-up steps so the first replay is the first real step: parameters and buffers are
        # restored in place and the optimizer state zeroed (Adam's initial state is zeros).
        model, opt = self.model, self.optimizer
        saved = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, self.warmup)):
                self._eager(x, y)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t, s in zip(list(model.parameters()) + list(model.buffers()), saved):
                t.copy_(s)
            for state in opt.state.values():
                for v in state.values():
                    if isinstance(v, Tensor):
                        v.zero_()
        sx, sy = x.clone(), y.clone()
        opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self._loss(sx, sy)
            loss.backward()
            opt.step()
        self._graph, self._static = graph, (sx, sy, loss.detach())

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if not self.cuda_graph:
            return self._eager(x, y)
        if self._graph is None:
            self._capture(x, y)
        sx, sy, loss = self._static  # type: ignore[misc]
        if sx.shape != x.shape or sy.shape != y.shape:
            raise ValueError(f"a captured step replays fixed shapes: x {tuple(sx.shape)}, y "
                             f"{tuple(sy.shape)}; got x {tuple(x.shape)}, y {tuple(y.shape)} "
                             f"(drop the last partial batch or use cuda_graph=False)")
        sx.copy_(x, non_blocking=True)
        sy.copy_(y, non_blocking=True)
        self._graph.replay()  # type: ignore[union-attr]
        return loss


def make_train_step(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                    lr: float = 1e-3,
                    loss_fn: Callable[[Tensor, Tensor], Tensor] = ensemble_loss,
                    cuda_graph: bool = False, warmup: int = 3,
                    precision: str = "fp32") -> TrainStep:
    """A training step for a stacked model: ``step(x, y)`` runs forward, loss, backward and one
    optimizer step, and returns the loss as a detached 0-d device tensor (no host sync).

    model: maps x — (S, B, ...) per member or (B, ...) shared — to (S, B, C) logits (a
    :class:`faststeal.nn.StackedModule`). optimizer: defaults to :func:`make_optimizer`
    (fused Adam at ``lr``). loss_fn(logits, y): defaults to :func:`ensemble_loss` (y: (B,),
    (S, B) labels or (B, C), (S, B, C) probabilities). cuda_graph: capture the whole step once
    (after ``warmup`` undone warm-up steps) and replay it; needs fixed shapes, a CUDA model and no
    layer that draws a host seed per call (fused dropout, Bayesian layers) — those raise.
    precision: ``"fp32"`` or ``"bf16"`` (bfloat16 compute, float32 weights, optimizer and loss).
    """
    check_precision(precision)
    if optimizer is None:
        optimizer = make_optimizer(model.parameters(), lr=lr, capturable=cuda_graph)
    if any(p.device.type == "cpu" for p in model.parameters()):
        retain_freed_cpu_memory()
    return TrainStep(model, optimizer, loss_fn=loss_fn, cuda_graph=cuda_graph, warmup=warmup,
                     precision=precision)
