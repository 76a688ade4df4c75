"""bfloat16 training without the per-step casts: float32 master weights whose bfloat16 working
copies are written by the Adam step.

Under ``precision="bf16"`` the stacked ops cast their float32 weights to bfloat16 in every
forward (``autocast``), and autograd casts the bfloat16 weight gradients back to float32 in every
backward: two extra passes over every weight per training step, ~17% of a profiled S=5 mlp bf16
``steal()`` on a 2-core CPU (docs/benchmarks.md, "bf16 without the casts"). :class:`MasterWeights`
removes both on the CPU, the way mixed-precision optimizers with a bf16 parameter copy do, for the
weights the stacked linear ops cast (``ensemble_linear``, ``bayes_linear``; convolutions keep
autocast's own casts):

* inside :meth:`MasterWeights.active`, an op that would cast a float32 parameter of the
  optimizer to bfloat16 (``faststeal.ops.ensemble_linear.autocast_inputs``) gets the parameter's
  bfloat16 copy instead - a leaf tensor, so its gradient stays bfloat16 in ``copy.grad``;
* :meth:`MasterWeights.step` updates the float32 parameter and the optimizer's own Adam state
  (``optimizer.state[p]``, so ``state_dict`` and checkpoints are unchanged) from that gradient,
  plus any float32 ``p.grad`` from uses outside the ops, and writes the new bfloat16 copy in the
  same pass (``faststeal._C.adam_bf16_step_cpu``); then ``optimizer.step()`` updates the rest.

Numerics: the copy is ``p.to(torch.bfloat16)`` bit for bit (round to nearest even; a NaN is a
NaN, its payload may differ), and the update is torch's fused CPU Adam on the float32 sum of the
gradients: the kernel repeats the arithmetic of its vector loop FMA for FMA (as the torch wheels
compile it for AVX2 / AVX-512) and the last few elements of each tensor, which torch's scalar code
rounds differently, go to ``torch._fused_adam_`` itself. Where torch runs those kernels, training
with the copies is bit-identical to the cast path (tests/test_master_weights.py); elsewhere the
update may differ in the last bit.
A parameter used a second time in one forward gets the plain cast, so its gradients are summed in
float32 as on the cast path (bit for bit for two uses; the order of a longer sum may differ). A
parameter changed outside :meth:`step` by a torch operation (``load_state_dict``, an in-place edit
under ``no_grad``: its version counter or storage moves) gets a fresh copy at its next use; an
edit through ``p.data`` bypasses the version counter and is not seen (as it is not by autograd).

Where: CPU float32 parameters of a ``torch.optim.Adam`` with ``fused=True`` (what
:func:`faststeal.train_step.make_optimizer` builds on the CPU) and none of amsgrad, maximize,
capturable, differentiable, decoupled weight decay or a tensor lr; anywhere else (GPUs, SGD,
AdamW, ``MemberAdam``, a missing extension) :func:`disabled_reason` says why and training keeps
the cast path. ``FASTSTEAL_BF16_COPIES=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor

from . import _ext
from .checks import env_off

ENV = "FASTSTEAL_BF16_COPIES"

#: the float vector width of torch's CPU kernels: its fused Adam rounds the last numel % width
#: elements of a tensor differently from the rest, so :meth:`MasterWeights.step` leaves those to
#: torch and runs the fused kernel (the arithmetic of torch's vector loop) on the rest
_ATEN_VEC_WIDTH = {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 8)

#: .mw: the MasterWeights whose forward is running in this thread (set by MasterWeights.active)
_active = threading.local()


def host_disabled_reason() -> Optional[str]:
    """Why no optimizer gets bfloat16 copies in this process (the switch, the extension), or
    None."""
    if env_off(ENV):
        return f"{ENV}={os.environ[ENV]}"
    return _ext.unavailable_reason()


def disabled_reason(optimizer: torch.optim.Optimizer) -> Optional[str]:
    """Why :class:`MasterWeights` cannot run ``optimizer``'s bf16 steps, or None."""
    why = host_disabled_reason()
    if why is not None:
        return why
    if type(optimizer) is not torch.optim.Adam:
        return f"the optimizer is {type(optimizer).__name__}, not torch.optim.Adam"
    for group in optimizer.param_groups:
        for flag in ("amsgrad", "maximize", "capturable", "differentiable",
                     "decoupled_weight_decay"):
            if group.get(flag):
                return f"Adam with {flag}=True"
        if not group.get("fused"):
            return "Adam without fused=True"
        if isinstance(group["lr"], Tensor):
            return "Adam with a tensor lr"
    return None


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No working copies inside (the tuner's timed forwards run here: they must not use up the
    copies of the training forward they interrupt)."""
    prev, _active.mw = getattr(_active, "mw", None), None
    try:
        yield
    finally:
        _active.mw = prev


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, or inside :meth:`MasterWeights.active` the bfloat16 working copy of a
    parameter it manages (the ops' autocast casts go through here)."""
    mw = getattr(_active, "mw", None)
    return t.to(dtype) if mw is None else mw._cast(t, dtype)


class _Copy:
    __slots__ = ("leaf", "pid", "version", "ptr", "used")

    def __init__(self, p: Tensor) -> None:
        self.leaf = p.detach().to(torch.bfloat16).requires_grad_()
        self.pid, self.version, self.ptr, self.used = id(p), p._version, p.data_ptr(), False


class MasterWeights:
    """bfloat16 working copies of ``optimizer``'s CPU float32 parameters, updated by the Adam
    step itself (see the module docstring). ``optimizer`` must pass :func:`disabled_reason`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        why = disabled_reason(optimizer)
        if why is not None:
            raise ValueError(f"MasterWeights cannot run this optimizer: {why}")
        self.optimizer = optimizer
        self._params = {id(p): p for g in optimizer.param_groups for p in g["params"]
                        if p.device.type == "cpu" and p.dtype == torch.float32}
        self._copies: dict[int, _Copy] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The context one training forward runs in: casts of managed parameters to bfloat16
        return their working copies (each copy once; a second use gets the plain cast). A copy's
        gradient still unused from an earlier backward (gradients accumulated over several
        backwards before one :meth:`step`) moves to ``p.grad`` in float32 first, so that no
        gradient is summed in bfloat16. To discard gradients instead, call :meth:`zero_grad`
        (``optimizer.zero_grad`` does not see the copies)."""
        for c in self._copies.values():
            c.used = False
            g = c.leaf.grad
            if g is not None:
                p = self._params[c.pid]
                p.grad = g.float() if p.grad is None else p.grad + g.float()
                c.leaf.grad = None
        prev, _active.mw = getattr(_active, "mw", None), self
        try:
            yield
        finally:
            _active.mw = prev

    def _cast(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        if (dtype != torch.bfloat16 or self._params.get(id(t)) is not t
                or not (t.requires_grad and torch.is_grad_enabled() and t.is_contiguous())):
            return t.to(dtype)
        c = self._copies.get(id(t))
        if c is None or c.version != t._version or c.ptr != t.data_ptr():
            c = self._copies[id(t)] = _Copy(t)  # first use, or t changed outside step()
        if c.used:
            return t.to(dtype)
        c.used = True
        return c.leaf

    def zero_grad(self) -> None:
        """Drop the copies' gradients (as ``optimizer.zero_grad(set_to_none=True)`` drops the
        parameters')."""
        for c in self._copies.values():
            c.leaf.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step: the parameters whose copies got gradients through the fused kernel
        (their copy's gradient and their float32 ``.grad``, if any, are consumed: both are None
        afterwards, so clip or inspect gradients before, not here), then ``optimizer.step()``
        for the rest (its step hooks run then, after the fused updates, and do not see them).
        A parameter listed twice in a group (torch.optim warns) is updated once; torch's own
        Adam would update it twice."""
        opt = self.optimizer
        for group in opt.param_groups:
            todo, states, seen = [], [], set()  # the parameters the kernel updates, their states
            for p in group["params"]:
                c = self._copies.get(id(p))
                if c is None or c.leaf.grad is None or id(p) in seen:  # (torch allows repeats)
                    continue
                seen.add(id(p))
                state = opt.state[p]
                if not state:  # as torch.optim.Adam initialises it (fused: a float32 step)
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                todo.append((p, c))
                states.append(state)
            if not todo:
                continue
            _update([p for p, _ in todo], [c.leaf for _, c in todo], states, group)
            for p, c in todo:
                c.leaf.grad = None
                p.grad = None
            # the kernel wrote p and the copy through pointers: tell autograd (a graph still
            # holding them fails loudly), then take p's new version as the copy's
            torch.autograd.graph.increment_version([t for p, c in todo for t in (p, c.leaf)])
            for p, c in todo:
                c.version, c.ptr = p._version, p.data_ptr()
        opt.step()


def _update(params: list[Tensor], copies: list[Tensor], states: list[dict],
            group: dict) -> None:
    """One Adam update of each float32 ``params[i]`` from ``copies[i].grad`` (+ its own float32
    ``.grad``, if any) with ``states[i]``, counting its step and writing ``copies[i]``: the fused
    kernel on the first numel - numel % width elements of every parameter, all in one call that
    checks every argument before it writes anything (its errors index these lists), then
    torch's own fused Adam on the rest (the elements its scalar code rounds differently; a few
    per tensor) - bit for bit torch's step."""
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    counts = [p.numel() - p.numel() % _ATEN_VEC_WIDTH for p in params]
    _ext.C.adam_bf16_step_cpu([p.detach() for p in params], [c.grad for c in copies],
                              [p.grad for p in params], [st["exp_avg"] for st in states],
                              [st["exp_avg_sq"] for st in states], [c.detach() for c in copies],
                              [int(st["step"]) + 1 for st in states], counts, lr, beta1, beta2,
                              eps, wd)
    torch._foreach_add_([st["step"] for st in states], 1)
    tail = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "copies")}
    for p, c, st, b in zip(params, copies, states, counts):
        if b == p.numel():
            continue
        g = c.grad.view(-1)[b:].float()
        if p.grad is not None:
            g = g + p.grad.view(-1)[b:]
        for k, t in zip(tail, (p.detach().view(-1)[b:], g, st["exp_avg"].view(-1)[b:],
                               st["exp_avg_sq"].view(-1)[b:], st["step"],
                               c.detach().view(-1)[b:])):
            tail[k].append(t)
    if tail["params"]:
        torch._fused_adam_(tail["params"], tail["grads"], tail["exp_avgs"], tail["exp_avg_sqs"],
                           [], tail["steps"], lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd,
                           eps=eps, amsgrad=False, maximize=False)
        torch._foreach_copy_(tail["copies"], tail["params"])
