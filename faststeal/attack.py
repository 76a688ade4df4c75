"""The attack: choose queries, ask the oracle, train surrogates on the answers, evaluate them.

``steal`` is the bring-your-own-victim entry point: any classifier (an ``nn.Module`` or a callable
from a batch of inputs to logits/probabilities), the attacker's pool and the test set as tensors
or torch Datasets. :func:`faststeal.runs.run_comparison` drives the same functions for the
registry datasets and the zoo victims.
"""

from __future__ import annotations

import glob
import math
import os
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import metrics, ops
from .checks import positive_int
from .metrics import NonFiniteError  # noqa: F401  (raised by check_finite; public name here)
from .methods import METHODS, build_method
from .methods.base import Method
from .methods.deep_ensemble import DeepEnsemble
from .oracle import PREFLIGHT_ROWS, Oracle, check_victim_output

TensorOrDataset = Union[torch.Tensor, tuple, torch.utils.data.Dataset]


def random_queries(pool_size: int, budget: int, seed: int) -> torch.Tensor:
    """``budget`` distinct pool indices drawn uniformly (the baseline query strategy)."""
    if budget > pool_size:
        raise ValueError(f"budget ({budget}) is larger than the attacker pool ({pool_size} images)")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(pool_size, generator=g)[:budget]


def query_oracle(oracle: Oracle, indices: torch.Tensor, batch_size: int = 1024,
                 progress: bool = True) -> tuple[torch.Tensor, Any]:
    """Ask the oracle about ``indices`` in batches; returns (training targets, raw answers list)."""
    from .progress import progress_bar

    targets = []
    answers = []
    for start in progress_bar(range(0, len(indices), batch_size), desc="querying victim",
                              unit="batch", disable=not progress, leave=False):
        a = oracle.query(indices[start:start + batch_size])
        answers.append(a)
        targets.append(oracle.targets(a))
    return torch.cat(targets), answers


@torch.no_grad()
def victim_outputs(victim: Callable, x: torch.Tensor, batch_size: int = 1024,
                   outputs: str = "logits") -> torch.Tensor:
    """The victim's probabilities on evaluation data (the experimenter's view, not the attacker's).

    Checked as the oracle checks its answers (:func:`faststeal.oracle.check_victim_output`):
    (N, C), finite, probabilities when ``outputs="probs"``.
    """
    was_training = isinstance(victim, nn.Module) and victim.training
    if isinstance(victim, nn.Module):
        victim.eval()
    try:
        out = [victim(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    finally:
        if was_training:
            victim.train()
    num_classes = None
    for o, i in zip(out, range(0, len(x), batch_size)):  # one C across all batches
        num_classes = check_victim_output(o, len(x[i:i + batch_size]), outputs,
                                          num_classes=num_classes).shape[1]
    out = torch.cat(out).float()
    return out.softmax(-1) if outputs == "logits" else out


def check_labels(name: str, y: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless every label of ``y`` lies in [0, num_classes) (the victim's
    classes): a label the victim cannot answer makes every accuracy meaningless."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}) (the victim answers "
                         f"{num_classes} classes), got labels from {int(y.min())} to "
                         f"{int(y.max())}")


def train_and_evaluate(method: str, arch: Any, x: torch.Tensor, targets: torch.Tensor, *,
                       test_x: torch.Tensor, test_y: torch.Tensor, victim_labels: torch.Tensor,
                       victim_probs: Optional[torch.Tensor], num_classes: int, seed: int,
                       epochs: int, batch_size: int, lr: float, device: str,
                       probe: Optional[torch.Tensor] = None,
                       record_every: Optional[int] = None,
                       hparams: Optional[dict] = None, progress: bool = True,
                       gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                       member_chunk: Union[int, str, None] = None,
                       checkpoint: Optional[str] = None,
                       log: Optional[Callable[[str], None]] = None,
                       ood_x: Optional[torch.Tensor] = None,
                       keep_model: bool = False) -> dict[str, Any]:
    """Train one method on the queried set and evaluate it on the test set.

    ``arch``: the surrogate — a zoo name or anything :func:`faststeal.models.resolve_surrogate`
    takes. ``record_every``: optimizer steps between diversity-trace records on ``probe`` (None:
    :func:`trace_interval`, about ``TRACE_POINTS`` points). ``ood_x``: (N_ood, ...)
    out-of-distribution inputs (another dataset, in the test set's input space); with it the
    metrics include the OOD AUROCs of :func:`faststeal.metrics.evaluate`. ``keep_model``: also
    return the trained surrogate as ``"stolen"`` (a :class:`faststeal.stolen.StolenModel`; None
    when the members were trained in blocks).

    ``gather`` combines member predictions across ranks when the members are sharded
    (:mod:`faststeal.distributed`); metrics are then computed on all members.

    ``member_chunk`` (Deep Ensemble family only, see :func:`member_chunkable`): train the members
    in sequential blocks of that many (``member_range``), one block at a time in this process,
    and concatenate their predictions and probe logits as the distributed gather does; member
    seeds depend only on the member index, so the members are the same networks as in one
    block. ``"auto"`` starts with all members and halves the block after every CUDA
    out-of-memory error (blocks already trained are kept). ``checkpoint``: a file path for the
    per-epoch fit checkpoints (:meth:`faststeal.methods.base.Method.fit`); member blocks use
    ``<stem>.members<a>-<b><ext>`` next to it. The files are left in place; remove them with
    :func:`remove_checkpoints` once the result is stored. ``log`` receives progress messages
    (the halving of ``"auto"``); default: print.
    """
    member_chunk = check_member_chunk(member_chunk)
    log = log or _print_log
    hp = dict(hparams or {})
    if record_every is None:
        record_every = trace_interval(len(x), batch_size, epochs)
    fit_kw = dict(epochs=epochs, batch_size=batch_size, lr=lr, record_every=record_every,
                  progress=progress)
    build_kw = dict(surrogate=arch, input_shape=tuple(x.shape[1:]), num_classes=num_classes,
                    seed=seed, device=device)
    m = None
    t0 = time.perf_counter()
    if member_chunk is not None and not member_chunkable(method):
        log(f"{method}: --member-chunk ignored (only the Deep Ensemble family trains its members "
            f"independently)")
    if member_chunk is not None and member_chunkable(method):
        members, ood_members, trace, hp_out, train_s, eval_s = _train_in_chunks(
            method, x, targets, test_x, ood_x, probe, hp, member_chunk, gather, checkpoint, log,
            build_kw, fit_kw)
        t_eval = time.perf_counter() - eval_s  # the blocks' test predictions count as eval
        probs, ood_probs = _mean_softmax(members), _mean_softmax(ood_members)
    else:
        m = build_method(method, **build_kw, **hp)
        if gather is not None:
            m.gather_members = gather
        try:
            m.fit(x, targets, probe=probe, checkpoint=member_checkpoint(
                checkpoint, hp.get("member_range")), **fit_kw)
        except torch.cuda.OutOfMemoryError as exc:
            raise RuntimeError(_oom_message(method, m.num_members, batch_size)) from exc
        train_s = time.perf_counter() - t0
        t_eval = time.perf_counter()
        members = m.predict_members(test_x)
        ood_members = None if ood_x is None else m.predict_members(ood_x)
        if gather is not None:
            members = gather(members)
            ood_members = None if ood_members is None else gather(ood_members)
        if gather is not None or type(m).predict_proba is Method.predict_proba:
            # the base predict_proba is this formula on these members: no second prediction
            probs, ood_probs = _mean_softmax(members), _mean_softmax(ood_members)
        else:  # a method with its own predictive (Laplace's probit)
            probs = m.predict_proba(test_x)
            ood_probs = None if ood_x is None else m.predict_proba(ood_x)
        trace, hp_out = list(m.trace), dict(m.hparams())
    check_finite(method, members, trace, seed)
    res = metrics.evaluate(members, victim_labels, test_y, mean_probs=probs,
                           victim_probs=victim_probs, ood_member_logits=ood_members,
                           ood_mean_probs=ood_probs, who=f"{method} (seed {seed})")
    res["train_seconds"] = train_s
    res["eval_seconds"] = time.perf_counter() - t_eval
    hp_out["num_members"] = int(members.shape[0])
    out = {"metrics": res, "trace": trace, "hparams": hp_out, "seconds": train_s}
    if keep_model:
        from .stolen import StolenModel
        out["stolen"] = None if m is None or gather is not None else StolenModel(m)
    return out


def _mean_softmax(members: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """p̄ of (S, B, C) member logits exactly as ``Method.predict_proba`` computes it, for members
    trained in blocks or gathered from ranks: the same formula on the same members gives the
    same p̄, prediction and calibration to the last bit as one process."""
    return None if members is None else torch.softmax(members.float(), dim=-1).mean(0)


#: points of an automatic diversity trace (``record_every=None``)
TRACE_POINTS = 50


def trace_interval(rows: int, batch_size: int, epochs: int, points: int = TRACE_POINTS) -> int:
    """Optimizer steps between trace records so that a fit of ``epochs`` epochs over ``rows``
    training rows in batches of ``batch_size`` records about ``points`` points (plus iteration
    0 and the end); at least 1 (every step)."""
    steps = max(1, math.ceil(rows / max(1, batch_size))) * max(1, epochs)
    return max(1, steps // max(1, points))


def _print_log(msg: str) -> None:
    print(f"[faststeal] {msg}", flush=True)


def _oom_message(method: str, members: int, batch_size: int) -> str:
    return (f"{method}: out of GPU memory training {members} member(s) at batch size "
            f"{batch_size} per member; lower --batch-size, train the members in smaller blocks "
            f"with --member-chunk N or --member-chunk auto (Deep Ensemble family), use fewer "
            f"members (--method-params '{{\"{method}\": {{\"members\": ...}}}}'), or shard "
            f"the members over GPUs with --nproc N --shard-members")


def member_chunkable(method: str) -> bool:
    """Whether ``method``'s members train independently and can be trained in blocks: the Deep
    Ensemble family (``member_range``); not methods whose members share a loss (NCL, repulsive)
    or a network (MC Dropout, BBB, SWAG, Laplace)."""
    cls = METHODS.get(method)
    return cls is not None and issubclass(cls, DeepEnsemble)


def check_member_chunk(value: Union[int, str, None]) -> Union[int, str, None]:
    """Validate a ``member_chunk`` setting: None, ``"auto"`` or an int >= 1."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"member_chunk must be a positive int, 'auto' or None, got "
                        f"{type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"member_chunk must be a positive int, 'auto' or None, got {value}")
    return value


def member_checkpoint(checkpoint: Optional[str], member_range) -> Optional[str]:
    """The checkpoint file of members [a, b): ``<stem>.members<a>-<b><ext>`` (None stays None)."""
    if checkpoint is None or member_range is None:
        return checkpoint
    root, ext = os.path.splitext(os.fspath(checkpoint))
    return f"{root}.members{int(member_range[0])}-{int(member_range[1])}{ext}"


def remove_checkpoints(checkpoint: Optional[str]) -> None:
    """Delete ``checkpoint`` and its member-block files (:func:`member_checkpoint`), if present."""
    if checkpoint is None:
        return
    root, ext = os.path.splitext(os.fspath(checkpoint))
    for path in [os.fspath(checkpoint), *glob.glob(f"{glob.escape(root)}.members*-*{ext}")]:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


class _ProbeRecorder:
    """Stands in for ``Method.gather_members`` while one member block trains: keeps the block's
    probe logits of every trace point (by trace index; the re-recorded final point overwrites)
    so the blocks' traces can be combined afterwards. Stateful, so fit checkpoints carry it."""

    def __init__(self, method) -> None:
        self.method = method
        self.logits: dict[int, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.logits[len(self.method.trace)] = logits.detach().clone()
        return logits

    def state_dict(self) -> dict[str, Any]:
        return {"logits": {k: v.cpu() for k, v in self.logits.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = self.method.device
        self.logits = {int(k): v.to(dev) for k, v in state["logits"].items()}


def _train_in_chunks(method, x, targets, test_x, ood_x, probe, hp, chunk, gather, checkpoint,
                     log, build_kw, fit_kw):
    """Train the members of ``hp["member_range"]`` (default: all) block by block; returns
    (member test logits, member OOD logits or None, combined trace, hparams, training seconds,
    prediction seconds)."""
    total = hp.get("members", METHODS[method].DEFAULTS["members"])
    lo, hi = hp.get("member_range") or (0, total)
    auto = chunk == "auto"
    size = (hi - lo) if auto else chunk
    blocks: list[dict[str, Any]] = []
    t0, eval_s = time.perf_counter(), 0.0
    start = lo
    while start < hi:
        stop = min(start + size, hi)
        ckpt = member_checkpoint(checkpoint, (start, stop))
        failed = False
        try:
            m = build_method(method, **build_kw, **{**hp, "member_range": (start, stop)})
            rec = _ProbeRecorder(m)
            m.gather_members = rec
            m.fit(x, targets, probe=probe, checkpoint=ckpt, **fit_kw)
            t_eval = time.perf_counter()
            logits = m.predict_members(test_x)
            ood = None if ood_x is None else m.predict_members(ood_x)
            eval_s += time.perf_counter() - t_eval
            blocks.append({"logits": logits, "ood": ood, "trace": list(m.trace),
                           "probe": rec.logits, "hparams": dict(m.hparams())})
            start = stop
        except torch.cuda.OutOfMemoryError as exc:
            if not auto or stop - start == 1:
                raise RuntimeError(_oom_message(method, stop - start, fit_kw["batch_size"])) \
                    from exc
            failed = True
        if failed:  # outside the except block, so the failed block's tensors can be freed
            m = rec = None
            remove_checkpoints(ckpt)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = max(1, (stop - start) // 2)
            log(f"{method}: out of GPU memory training members {start}-{stop - 1}; retrying in "
                f"blocks of {size} member(s) (--member-chunk auto)")
    train_s = time.perf_counter() - t0 - eval_s
    members = torch.cat([b["logits"] for b in blocks])
    ood = None if ood_x is None else torch.cat([b["ood"] for b in blocks])
    if gather is not None:
        members = gather(members)
        ood = None if ood is None else gather(ood)
    trace = _combine_traces(blocks, gather)
    hp_out = blocks[0]["hparams"]
    hp_out["member_range"] = hp.get("member_range")
    return members, ood, trace, hp_out, train_s, eval_s


def _combine_traces(blocks: list[dict[str, Any]], gather) -> list[dict]:
    """One trace for all members from the blocks' traces: the statistics are recomputed on the
    concatenated (and, when sharded, gathered) probe logits of every trace point, as
    ``Method._record`` computes them; the loss is the sum of the blocks' losses (the training
    loss is a sum over members)."""
    first = blocks[0]["trace"]
    if any(len(b["trace"]) != len(first) for b in blocks):
        raise RuntimeError("member blocks recorded traces of different lengths")
    out = []
    for i, entry in enumerate(first):
        logits = torch.cat([b["probe"][i] for b in blocks])
        if gather is not None:
            logits = gather(logits)
        st = ops.member_stats(logits)
        values = torch.stack([st.variance.mean(), st.mutual_info.mean(),
                              st.disagreement.mean()]).tolist()
        losses = [b["trace"][i]["loss"] for b in blocks]
        loss = None if any(v is None for v in losses) else sum(losses[1:], losses[0])
        out.append({**entry, "members": int(logits.shape[0]), "variance": values[0],
                    "mutual_info": values[1], "disagreement": values[2], "loss": loss})
    return out


def check_finite(method: str, member_logits: torch.Tensor, trace: Sequence[dict],
                 seed: Optional[int] = None) -> None:
    """Raise :class:`NonFiniteError` (a diverged cell is stopped, never averaged over) naming the
    method, the seed, the members whose test predictions hold NaN/inf and the first bad
    iteration."""
    bad_loss = [t["iteration"] for t in trace
                if t.get("loss") is not None and not math.isfinite(t["loss"])]
    finite = torch.isfinite(member_logits.reshape(member_logits.shape[0], -1)).all(1)
    bad_members = (~finite).nonzero().flatten().tolist()
    if bad_members or bad_loss:
        where = (f"first non-finite training loss at iteration {bad_loss[0]}" if bad_loss
                 else "training loss finite at every record point")
        who = method if seed is None else f"{method} (seed {seed})"
        raise NonFiniteError(
            f"{who}: member(s) {bad_members or 'none'} of {member_logits.shape[0]} produced "
            f"non-finite outputs ({where}); lower the learning rate or check the targets")


def _as_xy(name: str, data: TensorOrDataset) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    from .methods.base import as_tensor

    if isinstance(data, torch.Tensor) or type(data).__module__ == "numpy":
        return as_tensor(name, data), None
    if isinstance(data, (tuple, list)) and len(data) == 2 and (
            isinstance(data[0], torch.Tensor) or type(data[0]).__module__ == "numpy"):
        return as_tensor(f"{name}[0]", data[0]), as_tensor(f"{name}[1]", data[1])
    if isinstance(data, torch.utils.data.Dataset):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        if isinstance(items[0], (tuple, list)):
            return (torch.stack([torch.as_tensor(i[0]) for i in items]),
                    torch.as_tensor([int(i[1]) for i in items]))
        return torch.stack([torch.as_tensor(i) for i in items]), None
    raise TypeError(f"{name} must be a tensor or numpy array, an (x, y) tuple of them or a torch "
                    f"Dataset, got {type(data).__name__}")


class ArtVictim:
    """An ART classifier (anything with ``predict(np.ndarray) -> np.ndarray``) as a victim
    callable on tensors. ``outputs``: what ``predict`` returns (``"probs"`` or ``"logits"``)."""

    def __init__(self, classifier: Any) -> None:
        self.classifier = classifier

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        out = self.classifier.predict(x.detach().cpu().numpy().astype(np.float32))
        return torch.as_tensor(np.asarray(out), dtype=torch.float32, device=x.device)


def _is_art(victim: Any) -> bool:
    return not isinstance(victim, nn.Module) and callable(getattr(victim, "predict", None))


def _looks_like_probs(out: torch.Tensor) -> bool:
    return bool((out >= 0).all()) and torch.allclose(out.sum(-1), torch.ones_like(out[:, 0]),
                                                      atol=1e-3)


class StealResult(dict):
    """``faststeal.steal``'s result: the dict of metrics it always was
    (``victim_test_accuracy``, ``queries``, ``results``: {method: [per-seed metrics]}), plus the
    trained surrogates: ``models`` {method: [:class:`~faststeal.stolen.StolenModel` per seed]}
    and :meth:`stolen`."""

    models: dict

    def stolen(self, method: Optional[str] = None, seed: Optional[int] = None):
        """The StolenModel of ``method`` (default: the only/first one) for ``seed`` (default:
        the first seed)."""
        if not self.models:
            raise ValueError("no models were kept (keep_models=False)")
        method = method if method is not None else next(iter(self.models))
        if method not in self.models:
            raise ValueError(f"no model for method {method!r}; have {sorted(self.models)}")
        seeds = [r["seed"] for r in self["results"][method]]
        if seed is None:
            return self.models[method][0]
        if seed not in seeds:
            raise ValueError(f"no {method} model for seed {seed}; seeds: {seeds}")
        return self.models[method][seeds.index(seed)]


def steal(victim: Any, pool: TensorOrDataset, test: TensorOrDataset, budget: int, *,
          methods: Union[str, Sequence[str]] = ("baseline",), surrogate: Any = None,
          surrogate_arch: Optional[str] = None, output_mode: str = "label", topk: int = 1,
          temperature: float = 1.0, decimals: Optional[int] = None,
          query: str = "random", query_params: Optional[dict] = None,
          query_method: str = "deep-ensemble", defense: Optional[str] = None,
          defense_params: Optional[dict] = None,
          seeds: Union[int, Sequence[int]] = 1, epochs: int = 10,
          batch_size: int = 128, lr: float = 1e-3, device: str = "cpu",
          victim_outputs_kind: Optional[str] = None, query_seed: int = 0, progress: bool = True,
          method_params: Optional[dict[str, dict]] = None,
          keep_models: bool = True, precision: str = "fp32") -> StealResult:
    """Steal ``victim`` with a query budget; train each method per seed and evaluate it.

    victim: an ``nn.Module``, a callable mapping a (B, ...) batch to (B, C) logits (or
    probabilities, ``victim_outputs_kind="probs"``), or an ART classifier (anything with
    ``predict(np.ndarray)``; probabilities or logits detected from its answers).
    pool: attacker inputs (N, ...) (labels, if given, are ignored); test: (x, y) or a Dataset of
    (x, y) (or x alone: accuracy is then against the victim); tensors or numpy arrays.
    methods: names from :data:`faststeal.methods.METHODS`, a comma-separated string, or
    ``"all"`` (the baseline and the five UQ methods). surrogate: a zoo name (default ``"mlp"``),
    ``"torchvision:NAME"``, ``"module:factory"``, an ``nn.Module`` template or a zero-argument
    factory (``surrogate_arch`` is its old name). output_mode / topk / temperature / decimals:
    what the victim's API returns (:class:`faststeal.oracle.Oracle`). query: the query strategy
    (``random`` or one of :data:`faststeal.query.STRATEGIES`: the queries are chosen by an
    active loop with a ``query_method`` surrogate, :func:`faststeal.active.run_active`);
    query_params: the strategy's parameters. defense / defense_params: a defended victim
    (:data:`faststeal.defenses.DEFENSES`; metrics stay against the undefended victim).
    method_params: {method: hyperparameters}, validated (names and values) before any query.
    precision: ``"fp32"`` or ``"bf16"`` (bfloat16 compute in the surrogates' stacked layers,
    float32 weights, optimizer, loss and metrics).

    Returns a :class:`StealResult`: ``{"victim_test_accuracy", "queries", "results": {method:
    [per-seed metrics]}}`` and, with ``keep_models``, ``result.models`` / ``result.stolen()``.
    """
    from .methods import UQ_METHODS, check_method_params, parse_methods
    from .models import resolve_surrogate
    from .oracle import OUTPUT_MODES
    from .train_step import check_precision

    check_precision(precision)

    if surrogate is not None and surrogate_arch is not None:
        raise TypeError("give surrogate= (surrogate_arch is its old name), not both")
    surrogate = surrogate if surrogate is not None else (surrogate_arch or "mlp")
    if isinstance(surrogate, str):  # a name is checked before any query; shapes after the test
        from .models import check_surrogate_name

        check_surrogate_name(surrogate)
    method_list = parse_methods(methods)
    params = check_method_params(method_params, method_list)
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
    pool_x, _ = _as_xy("pool", pool)
    test_x, test_y = _as_xy("test", test)
    positive_int("budget", budget)
    if not pool_x.dtype.is_floating_point and surrogate in ("mlp", "lenet", "cnn-wide",
                                                            "resnet-small"):
        raise TypeError(f"pool must hold floating inputs, got dtype {pool_x.dtype}")
    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    seed_list = (list(range(positive_int("seeds", seeds))) if isinstance(seeds, int)
                 else list(seeds))
    if not seed_list:
        raise ValueError("seeds must be a positive int or a non-empty list of seeds, got "
                         f"{seeds!r}")
    if query != "random":  # before the victim sees anything (the active loop starts later)
        from .query import make_strategy

        make_strategy(query, **(query_params or {}))
        parse_methods(query_method)
    if _is_art(victim):
        victim = ArtVictim(victim)
        if victim_outputs_kind is None:
            victim_outputs_kind = ("probs" if _looks_like_probs(victim(test_x[:16].to(device)))
                                   else "logits")
    victim_outputs_kind = victim_outputs_kind or "logits"
    from .defenses import build_defense, query_until_refused

    dfn = build_defense(defense, **(defense_params or {}))
    oracle_victim, oracle_outputs = dfn.wrap_victim(victim, victim_outputs_kind)
    oracle = Oracle(oracle_victim, pool_x, budget, output_mode=output_mode, k=topk,
                    temperature=temperature, decimals=decimals, device=device,
                    victim_outputs=oracle_outputs, probs_atol=dfn.probs_atol)
    oracle = dfn.wrap_oracle(oracle)
    idx = random_queries(len(pool_x), budget, query_seed) if query == "random" else None
    if idx is not None:
        # before any work: a few pool images through the victim (charged, reused as answers),
        # so a pool the victim cannot take fails at once with a message naming its shape and
        # dtype; then the test set, so bad test labels are found before the budget is spent
        oracle.query(idx[:PREFLIGHT_ROWS])
    vprobs = victim_outputs(victim, test_x.to(device), outputs=victim_outputs_kind)
    vlabels = vprobs.argmax(-1)
    num_classes = vprobs.shape[-1]
    if test_y is not None:
        check_labels("test labels", test_y, num_classes)
    spec = resolve_surrogate(surrogate, tuple(pool_x.shape[1:]), num_classes)
    for method in method_list:  # hyperparameter values are checked before more queries
        build_method(method, surrogate=spec, input_shape=spec.input_shape,
                     num_classes=num_classes, seed=0, device="cpu", **params.get(method, {}))
    test_y = vlabels if test_y is None else test_y.to(device)
    vp = vprobs if output_mode in ("probs", "logits") else None
    if idx is None:
        from .active import ActiveConfig, run_active

        acfg = ActiveConfig(strategy=query, strategy_params=dict(query_params or {}),
                            method=query_method, epochs=epochs, batch_size=batch_size, lr=lr,
                            seed=query_seed)
        qhp = params.get(query_method, {})

        def factory(seed: int):
            return build_method(query_method, surrogate=spec, input_shape=spec.input_shape,
                                num_classes=num_classes, seed=seed, device=device, **qhp)

        run = run_active(oracle, acfg, test_x=test_x.to(device), victim_labels=vlabels,
                         test_y=test_y, victim_probs=vp, device=device, method_factory=factory,
                         eval_factory=factory, progress=progress)
        idx = torch.as_tensor(run["queried"], dtype=torch.int64)
    # cached answers are free
    idx, targets, refused = query_until_refused(oracle, idx, progress=progress)
    if idx.numel() == 0:
        raise RuntimeError("the defended victim refused every query")
    answered = getattr(oracle, "num_classes", None)
    if answered is not None and num_classes != answered:
        raise ValueError(f"the victim answers {answered} classes on the pool but "
                         f"{num_classes} on the test set")
    x = pool_x[idx].to(device)
    results: dict[str, list] = {}
    models: dict[str, list] = {}
    for method in method_list:
        for seed in seed_list:
            r = train_and_evaluate(
                method, spec, x, targets.to(device), test_x=test_x.to(device),
                test_y=test_y, victim_labels=vlabels, victim_probs=vp,
                num_classes=num_classes, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                device=device, progress=progress, keep_model=keep_models,
                hparams={**({"precision": precision} if precision != "fp32" else {}),
                         **(params.get(method) or {})})
            results.setdefault(method, []).append({"seed": seed, **r["metrics"]})
            if keep_models:
                models.setdefault(method, []).append(r["stolen"])
    out = StealResult({"victim_test_accuracy": float((vlabels == test_y).float().mean()),
                       "queries": {"used": oracle.used, "budget": oracle.budget,
                                   "refused": refused}, "results": results})
    out.models = models
    return out
