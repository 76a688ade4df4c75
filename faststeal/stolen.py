"""The stolen model: a trained surrogate as an ``nn.Module`` you can use, save and load.

:class:`StolenModel` wraps one fitted method (:class:`faststeal.methods.base.Method`):

* ``forward(x)`` -> ``(B, C)`` predictive probabilities, the method's own predictive (the mean
  over its S members of softmax; Laplace with ``predictive="probit"`` uses the probit
  approximation in :meth:`predict_proba`, the MC members in ``forward``). ``forward`` is
  differentiable in ``x`` (adversarial attacks need that); its S members are the same S
  networks on every call (the method's fixed prediction seed);
* :meth:`predict_members` -> ``(S, B, C)`` member logits; :meth:`uncertainty` -> per-input
  variance, entropy and mutual information; :meth:`members` -> plain modules where the method
  has them (Deep Ensemble family, the baseline, SWAG's weight samples);
* :meth:`save` / :func:`load`: weights plus the recipe to rebuild (method, surrogate, input
  shape, classes, seed, hyperparameters); loading gives identical predictions. A zoo,
  ``torchvision:`` or ``module:factory`` surrogate is stored by name; an in-memory template or
  factory is pickled (a factory must then be importable by name when loading). ``load`` unpickles:
  only load files you trust.
* :meth:`to_art`: an ART ``PyTorchClassifier`` (optional extra ``faststeal[art]``).

Inputs: tensors or numpy arrays of shape ``(B, *input_shape)``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .methods.base import STREAM_PREDICT, Method, as_tensor, seeded, subseed

#: 2: zoo surrogates are stacked by faststeal.stack; a "/1" file of a zoo surrogate holds the
#: state of the old hand-built zoo stack and cannot be loaded (user surrogates load either way)
FORMAT = "faststeal.stolen/2"
_OLD_FORMAT = "faststeal.stolen/1"


class StolenModel(nn.Module):
    """A fitted surrogate method as a module: ``forward(x)`` (B, *input_shape) -> (B, C) probs."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        if not isinstance(method, Method):
            raise TypeError(f"method must be a faststeal Method, got {type(method).__name__}")
        if not method.fitted:
            raise ValueError(f"the {method.name} surrogate is not fitted; call fit() first")
        self.method = method
        self.model = method.model  # registered, so .parameters() / .to() see the weights
        self.eval()

    # ------------------------------------------------------------------ describe
    @property
    def name(self) -> str:
        return self.method.name

    @property
    def num_classes(self) -> int:
        return self.method.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.method.input_shape

    @property
    def num_members(self) -> int:
        return self.method.num_members

    def extra_repr(self) -> str:
        return (f"method={self.name!r}, surrogate={self.method.arch!r}, members="
                f"{self.num_members}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}")

    # ------------------------------------------------------------------ predict
    def _x(self, x: Any) -> Tensor:
        return self.method._check_inputs("x", as_tensor("x", x))

    def _member_logits(self, x: Tensor) -> Tensor:
        """(S, B, C) member logits with autograd (eval mode, the fixed prediction seed)."""
        m = self.method
        was = m.model.training
        m.model.eval()
        try:
            with seeded(subseed(m.seed, STREAM_PREDICT), m.device):
                out = m._predict_chunk(x)
            return m.gather_members(out)
        finally:
            m.model.train(was)

    def forward(self, x: Union[Tensor, Any]) -> Tensor:
        """(B, C) predictive probabilities: mean over members of softmax(member logits)."""
        return torch.softmax(self._member_logits(self._x(x)).float(), dim=-1).mean(0)

    @torch.no_grad()
    def predict_proba(self, x: Any, batch_size: int = 1024) -> Tensor:
        """(B, C) the method's predictive (probit for Laplace when configured), batched."""
        return self.method.predict_proba(self._x(x), batch_size)

    @torch.no_grad()
    def predict(self, x: Any, batch_size: int = 1024) -> Tensor:
        """(B,) predicted labels (argmax of :meth:`predict_proba`)."""
        return self.predict_proba(x, batch_size).argmax(-1)

    @torch.no_grad()
    def predict_members(self, x: Any, batch_size: int = 1024) -> Tensor:
        """(S, B, C) member logits."""
        return self.method.predict_members(self._x(x), batch_size)

    @torch.no_grad()
    def uncertainty(self, x: Any, batch_size: int = 1024) -> dict[str, Tensor]:
        """Per input (B,): ``variance`` (mean_c Var_s p_s(c)), ``entropy`` (H of the mean
        prediction), ``mutual_info`` (BALD: H[p̄] - mean_s H[p_s]), ``disagreement``."""
        from . import ops

        st = ops.member_stats(self.predict_members(x, batch_size))
        return {"variance": st.variance, "entropy": st.entropy_of_mean,
                "mutual_info": st.mutual_info, "disagreement": st.disagreement}

    def members(self) -> list[nn.Module]:
        """The members as plain modules (copies): Deep Ensemble family and baseline (the trained
        networks), SWAG (its weight samples). MC Dropout, Bayes by Backprop and Laplace draw
        their members at prediction time (dropout masks, weight samples): ValueError."""
        m = self.method
        stack = getattr(m, "sampled_model", None) if m.name == "swag" else m.model
        if m.name in ("mc-dropout", "bbb", "laplace") or stack is None \
                or not hasattr(stack, "member"):
            raise ValueError(f"{m.name} draws its members at prediction time (dropout masks or "
                             f"weight samples); use predict_members(x)")
        return [stack.member(i) for i in range(int(stack.members))]

    # ------------------------------------------------------------------ save / load
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write weights and the recipe to rebuild to ``path`` (atomically)."""
        m = self.method
        spec = m.surrogate
        if spec.recipe is not None:
            surrogate: Any = spec.recipe
        elif spec.template is not None:
            surrogate = spec.template
        else:
            surrogate = spec.factory
        state = {"format": FORMAT, "method": m.name, "surrogate": surrogate,
                 "input_shape": list(m.input_shape), "num_classes": m.num_classes,
                 "seed": m.seed, "hparams": {k: m._hp[k] for k in m._given},
                 "state": m.state_dict()}
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except (AttributeError, TypeError, pickle.PicklingError) as exc:  # unpicklable factory
            raise ValueError(f"cannot save the surrogate {spec.name!r}: {exc}; use an "
                             f"importable factory ('module:factory') or a module template") \
                from exc
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def to_art(self, **kwargs: Any):
        """An ART ``PyTorchClassifier`` over this model (log of the predictive as its logits).

        kwargs go to ``PyTorchClassifier`` (e.g. ``clip_values=(0, 1)``). Needs the optional
        extra: ``pip install 'faststeal[art]'``.
        """
        try:
            from art.estimators.classification import PyTorchClassifier
        except ImportError as exc:
            raise ImportError("to_art needs the Adversarial Robustness Toolbox: "
                              "pip install 'faststeal[art]' (adversarial-robustness-toolbox)") \
                from exc
        kwargs.setdefault("loss", nn.CrossEntropyLoss())
        kwargs.setdefault("input_shape", self.input_shape)
        kwargs.setdefault("nb_classes", self.num_classes)
        dev = self.method.device
        kwargs.setdefault("device_type", "gpu" if dev.type == "cuda" else "cpu")
        return PyTorchClassifier(model=_LogPredictive(self), **kwargs)


class _LogPredictive(nn.Module):
    """log p̄(c|x): softmax of it is the predictive, so ART's cross-entropy attacks it."""

    def __init__(self, stolen: StolenModel) -> None:
        super().__init__()
        self.stolen = stolen

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(self.stolen(x).clamp_min(1e-12))


def load(path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None
         ) -> StolenModel:
    """Rebuild a :class:`StolenModel` written by :meth:`StolenModel.save` (unpickles: only load
    files you trust). ``device``: where to put it (default: where it was saved from)."""
    from .methods import build_method
    from .models import ARCHS

    state = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, _OLD_FORMAT):
        raise ValueError(f"{os.fspath(path)} is not a faststeal stolen model ({FORMAT})")
    if state["format"] == _OLD_FORMAT and state.get("surrogate") in ARCHS:
        raise ValueError(f"{os.fspath(path)} holds a zoo surrogate ({state['surrogate']!r}) "
                         f"saved by an older faststeal ({_OLD_FORMAT}), whose zoo stack had "
                         f"other weight names; steal it again with this version")
    dev = device if device is not None else "cpu"
    m = build_method(state["method"], surrogate=state["surrogate"],
                     input_shape=tuple(state["input_shape"]), num_classes=state["num_classes"],
                     seed=state["seed"], device=dev, **state["hparams"])
    m.load_state_dict(state["state"])
    return StolenModel(m)
