"""What a surrogate can be, resolved once: :func:`resolve_surrogate`.

Accepted everywhere a surrogate is named (methods, ``faststeal.steal``, ``Config``, the CLI):

* a zoo name (``"mlp"``, ``"lenet"``, ``"cnn-wide"``, ``"resnet-small"``; images ``(C, H, W)``
  only): the zoo's ready-made plain-model factory (:data:`faststeal.models.zoo.FACTORIES`),
  stacked by :func:`faststeal.stack` like any user model; a method's ``dropout=p`` uses the
  zoo's dropout positions;
* ``"torchvision:NAME"``: ``torchvision.models.get_model(NAME, num_classes=...)``;
* ``"package.module:factory"``: a function importable from the working directory; it is called
  with ``input_shape=`` and ``num_classes=`` when its signature has those parameters, else with
  no arguments;
* an ``nn.Module``: a template — its architecture, members re-initialised with each layer's
  ``reset_parameters`` (pass a factory to keep a model's own initialisation scheme);
* a zero-argument callable returning an ``nn.Module`` (a class or a function).

Non-zoo surrogates are checked once with a forward pass on two zero inputs of ``input_shape``:
the output must be ``(2, num_classes)``.

Run settings hash an in-memory surrogate by :func:`surrogate_key` (a name plus a digest of its
architecture) and show it by :func:`surrogate_label` (``"custom:<Name>"``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

#: what a surrogate setting can be (see the module docstring)
SurrogateLike = Union[str, nn.Module, Callable[[], nn.Module]]


@dataclass(frozen=True)
class Surrogate:
    """A resolved surrogate. ``name``: the zoo name, ``"torchvision:NAME"``, ``"module:factory"``
    or ``"custom:<ClassName>"``; ``zoo``: the zoo architecture or None; ``recipe``: a string that
    rebuilds it (None for an in-memory template or factory)."""

    name: str
    zoo: Optional[str]
    input_shape: tuple[int, ...]
    num_classes: int
    factory: Optional[Callable[[], nn.Module]] = None
    template: Optional[nn.Module] = None
    recipe: Optional[str] = None

    def plain(self) -> nn.Module:
        """A fresh plain (one-member) model of this architecture."""
        if self.zoo is not None:
            from .zoo import build_model
            return build_model(self.zoo, self.input_shape, self.num_classes)
        if self.template is not None:
            return copy.deepcopy(self.template)
        return _call_factory(self.factory)

    def build(self, members: int, *, dropout: float = 0.0, bayesian: bool = False,
              prior_sigma: float = 1.0, init: str = "reset",
              last_layer: Optional[str] = None) -> nn.Module:
        """The stacked model (:func:`faststeal.stack`): ``members`` members (1 and ``bayesian``
        for Bayes by Backprop). ``dropout > 0`` adds dropout: the zoo's dropout positions for a
        zoo name, else before every Linear but the first parameterised layer."""
        from ..nn.stack import stack
        src: Any
        if self.zoo is not None:
            from .zoo import FACTORIES
            src = functools.partial(FACTORIES[self.zoo], self.input_shape, self.num_classes,
                                    dropout=dropout)
        elif self.template is not None:
            src = self.template if dropout == 0 else insert_dropout(
                copy.deepcopy(self.template), dropout)
        elif dropout == 0:
            src = self.factory
        else:
            factory = self.factory
            src = lambda: insert_dropout(_call_factory(factory), dropout)  # noqa: E731
        return stack(src, members, init=init, input_shape=self.input_shape, bayesian=bayesian,
                     prior_sigma=prior_sigma, last_layer=last_layer)


def _call_factory(factory: Callable[[], nn.Module]) -> nn.Module:
    m = factory()
    if not isinstance(m, nn.Module):
        raise TypeError(f"the surrogate factory must return an nn.Module, got "
                        f"{type(m).__name__}")
    return m


def insert_dropout(model: nn.Module, p: float) -> nn.Module:
    """Put ``nn.Dropout(p)`` before every ``nn.Linear`` of ``model`` except the first
    parameterised layer (the raw input stays intact), in place; returns ``model``."""
    first = next((n for n, m in model.named_modules() if any(True for _ in m.parameters(False))),
                 None)
    targets = [n for n, m in model.named_modules() if type(m) is nn.Linear and n != first]
    if not targets:
        raise ValueError(f"dropout={p}: the surrogate ({type(model).__name__}) has no nn.Linear "
                         f"after its first layer to put dropout before")
    for name in targets:
        model.set_submodule(name, nn.Sequential(nn.Dropout(p), model.get_submodule(name)))
    return model


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"surrogate {spec!r}: expected 'package.module:factory'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # "importable from the working directory"
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"surrogate {spec!r}: cannot import module {mod_name!r} ({exc}); it "
                         f"must be importable from the working directory") from exc
    fn = mod
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"surrogate {spec!r}: module {mod_name!r} has no {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"surrogate {spec!r}: {attr!r} is not callable")
    return fn  # type: ignore[return-value]


def _bind_shape(fn: Callable[..., nn.Module], input_shape: tuple, num_classes: int
                ) -> Callable[[], nn.Module]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    kw: dict[str, Any] = {}
    if "input_shape" in params:
        kw["input_shape"] = input_shape
    if "num_classes" in params:
        kw["num_classes"] = num_classes
    return (lambda: fn(**kw)) if kw else fn


def _check_shape(input_shape: Any, zoo: bool) -> tuple[int, ...]:
    ok = isinstance(input_shape, (tuple, list, torch.Size)) and len(input_shape) >= 1 and all(
        not isinstance(d, bool) and isinstance(d, int) and d >= 1 for d in input_shape)
    if not ok or (zoo and len(input_shape) != 3):
        want = "(channels, height, width)" if zoo else "one example's shape, e.g. (C, H, W) or (F,)"
        raise ValueError(f"input_shape must be {want} of positive ints, got {input_shape!r}")
    return tuple(int(d) for d in input_shape)


@torch.no_grad()
def _dry_run(model: nn.Module, name: str, input_shape: tuple, num_classes: int) -> None:
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    was = model.training
    model.eval()
    try:
        try:
            out = model(torch.zeros(2, *input_shape, device=dev))
        except Exception as exc:  # integer inputs (nn.Embedding)?
            try:
                out = model(torch.zeros(2, *input_shape, device=dev, dtype=torch.long))
            except Exception:
                raise ValueError(f"surrogate {name} cannot run on inputs of shape "
                                 f"(batch, {', '.join(map(str, input_shape))}): "
                                 f"{type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"surrogate {name} must map (batch, {', '.join(map(str, input_shape))})"
                         f" to (batch, num_classes={num_classes}) logits; on 2 inputs it "
                         f"returned {got}")


def _torchvision_arch(spec: str) -> tuple[str, Any]:
    """The model name of ``"torchvision:NAME"`` and the torchvision module; ValueError when
    torchvision is missing or has no classification model of that name."""
    arch = spec.split(":", 1)[1]
    try:
        import torchvision
    except ImportError as exc:
        raise ValueError(f"surrogate {spec!r} needs torchvision (pip install "
                         f"torchvision)") from exc
    if arch not in torchvision.models.list_models(torchvision.models):
        raise ValueError(f"surrogate {spec!r}: torchvision has no classification model "
                         f"{arch!r}")
    return arch, torchvision


def check_surrogate_name(spec: Any, name: str = "surrogate") -> None:
    """Check a surrogate given by name before any data is loaded: a zoo name,
    ``"torchvision:NAME"`` or an importable ``"module:factory"`` (ValueError naming ``name``)."""
    from .zoo import ARCHS

    if not isinstance(spec, str):
        raise ValueError(f"{name} must be a zoo name {ARCHS}, 'torchvision:NAME' or "
                         f"'module.path:factory', got {type(spec).__name__} ({spec!r})")
    if spec in ARCHS:
        return
    if spec.startswith("torchvision:") and len(spec) > len("torchvision:"):
        _torchvision_arch(spec)
        return
    if ":" in spec and not spec.startswith("torchvision:"):
        _import_factory(spec)
        return
    raise ValueError(f"{name} must be one of {ARCHS}, 'torchvision:NAME' or "
                     f"'module.path:factory', got {spec!r}")


def check_surrogate(spec: Any, name: str = "surrogate") -> None:
    """Check a surrogate setting before any data is loaded: a name as
    :func:`check_surrogate_name` does (ValueError), an ``nn.Module`` template or a callable
    (a zero-argument factory; what it returns is checked when it is resolved) pass; anything
    else is a TypeError naming ``name``."""
    if isinstance(spec, str):
        check_surrogate_name(spec, name)
    elif not (isinstance(spec, nn.Module) or callable(spec)):
        raise TypeError(f"{name} must be a zoo name, 'torchvision:NAME', 'module.path:factory', "
                        f"an nn.Module or a zero-argument factory, got {type(spec).__name__} "
                        f"({spec!r})")


def surrogate_label(spec: Any) -> str:
    """The readable name of a surrogate setting: a name as given, ``"custom:<ClassName>"`` for an
    ``nn.Module`` template, ``"custom:<qualname>"`` for a factory; a :func:`surrogate_key` is
    shown as its name (the part before ``@``)."""
    if isinstance(spec, str):
        return spec.split("@", 1)[0] if spec.startswith("custom:") else spec
    if isinstance(spec, nn.Module):
        return f"custom:{type(spec).__name__}"
    return f"custom:{getattr(spec, '__qualname__', type(spec).__name__)}"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object addresses differ between processes


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):  # defined in a REPL, a builtin, a functools.partial, ...
        return ""


_PLAIN = (int, float, bool, str, type(None))


def _const(c: Any) -> str:
    """A process-independent rendering of a code constant: nested code objects (lambdas,
    comprehensions) by their own bytecode, never by their file and line; sets sorted."""
    if inspect.iscode(c):
        return (f"code({c.co_name} {c.co_code.hex()} {c.co_names} "
                f"[{', '.join(_const(k) for k in c.co_consts)}])")
    if isinstance(c, (tuple, list)):
        return f"({', '.join(_const(k) for k in c)})"
    if isinstance(c, frozenset):
        return f"frozenset({sorted(_const(k) for k in c)})"
    return _ADDRESS.sub("", repr(c))


def _functions(obj: Any) -> list[Callable]:
    """The plain functions behind ``obj``: itself, a bound method's or a partial's function, a
    callable instance's ``__call__``; for a class, every function of it and of its own
    (non-torch, non-builtin) base classes — an inherited ``forward`` included."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    obj = getattr(obj, "__func__", obj)
    if inspect.isfunction(obj):
        return [obj]
    if not inspect.isclass(obj):
        return _functions(type(obj).__call__) if callable(obj) else []
    fns = []
    for klass in obj.__mro__:
        if klass.__module__.startswith(("torch", "builtins")):
            continue
        fns += [f for _, f in sorted(vars(klass).items()) if inspect.isfunction(f)]
    return fns


def _code(obj: Any) -> str:
    """The bytecode, names and constants of the functions behind ``obj`` (:func:`_functions`):
    what its source says where the source cannot be read (a notebook, a REPL)."""
    return "\n".join(f"{f.__qualname__} {_const(f.__code__)}" for f in _functions(obj))


def _source_or_code(obj: Any) -> str:
    """The source of ``obj`` (its classes' and functions' text), else its bytecode: the source
    is what a user edits and stays the same across Python versions; the bytecode stands in where
    there is no source file."""
    return _source(obj) or _code(obj)


def _buffer_digest(t: torch.Tensor) -> str:
    """sha256 of a buffer's values; its dtype and layout alone where the values cannot be read
    as bytes (meta, sparse, quantized tensors)."""
    if t.is_meta or t.layout != torch.strided or t.is_quantized:
        return f"{t.layout} {t.dtype} {'meta' if t.is_meta else 'values not hashed'}"
    raw = t.detach().resolve_conj().resolve_neg().cpu().reshape(-1).contiguous()
    return hashlib.sha256(raw.view(torch.uint8).numpy().tobytes()).hexdigest()


def _describe_model(model: nn.Module) -> list[str]:
    """``repr`` (layer types and sizes); every parameter's and buffer's name, shape and dtype and
    every buffer's values; each module's plain attributes (ints, floats, bools, strings: a flag
    its ``forward`` reads is not in the repr); and the source (or, without one, the bytecode) of
    every non-torch module class and its own base classes (their ``forward``)."""
    lines = [_ADDRESS.sub("", repr(model))]
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        lines += [f"{kind} {n} {tuple(t.shape)} {t.dtype}" for n, t in items]
    lines += [f"buffer-values {n} {_buffer_digest(t)}" for n, t in model.named_buffers()
              if t.numel()]
    for name, m in model.named_modules():
        attrs = sorted((k, v) for k, v in vars(m).items()
                       if not k.startswith("_") and k != "training" and isinstance(v, _PLAIN))
        if attrs:
            lines.append(f"attrs {name or '<root>'} {attrs!r}")
    classes = {f"{c.__module__}.{c.__qualname__}": c for t in map(type, model.modules())
               for c in t.__mro__ if not c.__module__.startswith(("torch", "builtins"))}
    lines += [f"class {k}\n{_source_or_code(c)}" for k, c in sorted(classes.items())]
    return lines


def surrogate_key(spec: Any) -> str:
    """A stable fingerprint of a surrogate setting for the run store's configuration hash.

    A name is its own key (hashes of named surrogates are unchanged). An ``nn.Module`` template
    or a factory gets ``"<surrogate_label>@<module>.<qualname>#<sha256[:16]>"`` of a canonical
    description: for a template, its architecture (:func:`_describe_model`: repr, parameter and
    buffer names/shapes/dtypes, buffer values, plain module attributes, the source — bytecode
    where there is none — of its own module classes and their bases; not the parameter values:
    ``reset_parameters`` re-initialises the members, and a parameter of a module without
    ``reset_parameters`` keeps the template's value without being in the key); for a factory,
    its source (or bytecode, or repr) and the description of the model it builds (built once,
    under a forked RNG seeded with 0). The same model code in a new process gives the same key,
    so a rerun resumes its cells; another architecture (a width, a layer, an edited ``forward``)
    gives another key. Editing only a comment of that code changes the key too (its cells are
    recomputed: conservative)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, nn.Module):
        cls = type(spec)
        lines = _describe_model(spec)
    elif callable(spec):
        cls = spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a factory drawing random buffers gives one key everywhere
            lines = [_source_or_code(spec) or _ADDRESS.sub("", repr(spec))]
            lines += _describe_model(_call_factory(spec))
    else:
        raise TypeError(f"a surrogate must be a name, an nn.Module or a factory, got "
                        f"{type(spec).__name__}")
    where = (f"{getattr(cls, '__module__', None) or type(cls).__module__}."
             f"{getattr(cls, '__qualname__', type(cls).__qualname__)}")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return f"{surrogate_label(spec)}@{where}#{digest}"


def asdict_keyed(settings: Any, field: str) -> dict[str, Any]:
    """``dataclasses.asdict(settings)`` with the surrogate field ``field`` as its
    :func:`surrogate_key`: JSON-ready, and the user's model is neither deep-copied (asdict copies
    every non-dataclass value) nor put in the dict."""
    return dataclasses.asdict(dataclasses.replace(
        settings, **{field: surrogate_key(getattr(settings, field))}))


def resolve_surrogate(spec: SurrogateLike, input_shape: Optional[Sequence[int]],
                      num_classes: Optional[int], *, check: bool = True) -> Surrogate:
    """Resolve a surrogate given as a zoo name, ``"torchvision:NAME"``, ``"module:factory"``, an
    ``nn.Module`` template or a zero-argument factory (see the module docstring).

    input_shape: one example's shape; num_classes: the victim's class count. ``check`` runs the
    non-zoo model once on two zero inputs to validate its output shape. Raises ValueError /
    TypeError naming what is wrong.
    """
    from .zoo import ARCHS

    if isinstance(spec, Surrogate):
        return spec
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if spec is None:
        raise ValueError(f"a surrogate is required: a zoo name {ARCHS}, 'torchvision:NAME', "
                         f"'module:factory', an nn.Module or a factory")
    factory: Optional[Callable[[], nn.Module]] = None
    template: Optional[nn.Module] = None
    recipe: Optional[str] = None
    if isinstance(spec, str):
        if spec in ARCHS:
            return Surrogate(spec, spec, _check_shape(input_shape, True), num_classes,
                             recipe=spec)
        shape = _check_shape(input_shape, False)
        if spec.startswith("torchvision:"):
            arch, torchvision = _torchvision_arch(spec)
            factory = lambda: torchvision.models.get_model(arch, num_classes=num_classes)  # noqa
        elif ":" in spec:
            factory = _bind_shape(_import_factory(spec), shape, num_classes)
        else:
            raise ValueError(f"unknown surrogate {spec!r}: a zoo name {ARCHS}, "
                             f"'torchvision:NAME' or 'package.module:factory'")
        name = recipe = spec
    elif isinstance(spec, nn.Module):
        shape = _check_shape(input_shape, False)
        template, name = spec, surrogate_label(spec)
    elif callable(spec):
        shape = _check_shape(input_shape, False)
        factory, name = spec, surrogate_label(spec)
    else:
        raise TypeError(f"surrogate must be a zoo name, 'torchvision:NAME', 'module:factory', an "
                        f"nn.Module or a zero-argument factory, got {type(spec).__name__}")
    out = Surrogate(name, None, shape, num_classes, factory=factory, template=template,
                    recipe=recipe)
    if check:
        _dry_run(out.plain(), repr(name), shape, num_classes)
    return out
