"""The contract a method module fulfils, and the machinery every method shares (floor 3).

* **Parameters** — :class:`MethodConfig`: a frozen dataclass per method whose fields are declared with
  :func:`param` (type and allowed range); constructing it validates every value (non-finite, negative, zero, out of
  range, a fraction where an integer is needed, a string outside its choices …) and raises a ``ValueError`` that
  names the method, the parameter and what is allowed. Nothing is touched before that.
* **Reversible edits as data** — :class:`Undo` holds :class:`Action` objects, never closures: a patched model
  deep-copies (the copy's undo points at the copy's modules), pickles, and unpatches each copy on its own.
* **A patched model owns its configs** — :func:`privatize_configs` gives the model its own copies of the config
  objects its modules share, so two models built from one config never see each other's patch, and unpatching puts
  the untouched originals back (bit for bit, whatever the patch wrote into its copies).
* :class:`PatchInfo` / :class:`PatchState`: what a patch applied, kept on the model (``_longctx_state``).
* :class:`Transient`: a weak reference that is neither deep-copied nor pickled (a user's tokenizer).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

__all__ = [
    "Action", "SetAttr", "RemoveHook", "SetLimit", "FollowCasts", "follow_casts", "Undo", "Transient", "Check", "param", "MethodConfig",
    "LengthConfig", "Applied", "PatchInfo", "PatchState", "privatize_configs", "real_key_lengths", "STATE_ATTR",
    "ReachWarning", "input_length",
]

STATE_ATTR = "_longctx_state"  # the PatchState of a patched transformers model


# ---------------------------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """What one parameter accepts: ``kind`` (``int``, ``float``, ``bool`` or ``str``), bounds, and named values
    (``choices``: for a string, the only values; for a number, extra allowed strings such as ``"auto"``)."""

    kind: type = float
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = True  # None allowed (the method's default applies)

    def allowed(self) -> str:
        """What is allowed, in words ("an integer >= 1", "one of 'int', 'float'", …)."""
        if self.kind is bool:
            return "true or false"
        if self.kind is tuple:  # a list of numbers, each within the bounds
            bounds = [f"{op} {_num(v)}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt),
                                                     ("<=", self.le)) if v is not None]
            return "a non-empty list of finite numbers" + (" each " + " and ".join(bounds) if bounds else "")
        named = ", ".join(repr(c) for c in self.choices)
        if self.kind is str:
            return f"one of {named}" if self.choices else "a string"
        bounds = [f"{op} {_num(v)}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                  if v is not None]
        what = ("an integer" if self.kind is int else "a finite number") + (" " + " and ".join(bounds) if bounds
                                                                            else "")
        return what + (f", or {named}" if self.choices else "")

    def __call__(self, method: str, name: str, value: Any) -> Any:
        """``value`` normalised (an integral float to int, an int to float), or ``ValueError``."""
        if value is None and self.optional:
            return None
        if isinstance(value, str) and value in self.choices:
            return value
        if self.kind is bool:
            if isinstance(value, bool):
                return value
        elif self.kind is tuple:
            if isinstance(value, (list, tuple)) and value and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))
                    and self._in_range(float(x)) for x in value):
                return tuple(float(x) for x in value)
        elif self.kind is str:
            if isinstance(value, str) and not self.choices:
                return value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number) and self._in_range(number):
                if self.kind is float:
                    return number
                if number.is_integer():
                    return int(number)
        raise ValueError(f"{method}: {name} must be {self.allowed()}, got {value!r}")

    def _in_range(self, x: float) -> bool:
        return ((self.gt is None or x > self.gt) and (self.ge is None or x >= self.ge)
                and (self.lt is None or x < self.lt) and (self.le is None or x <= self.le))


def _num(v: float) -> str:
    return f"{v:g}"


def param(default: Any = None, *, kind: type = float, gt: float | None = None, ge: float | None = None,
          lt: float | None = None, le: float | None = None, choices: tuple[str, ...] = (),
          optional: bool = True, doc: str = "") -> Any:
    """A :class:`MethodConfig` field: its default, what it accepts (see :class:`Check`) and one line of help."""
    check = Check(kind, gt, ge, lt, le, tuple(choices), optional)
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's parameters: validated on construction (each field's :func:`param` check, then
    :meth:`validate` for rules between fields). Frozen: parameters travel as one immutable value."""

    method: ClassVar[str] = "method"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(self.method, f.name, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Rules between fields (override); raise ``ValueError`` naming the parameters."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def checks(cls) -> dict[str, Check]:
        """Each validated parameter's :class:`Check` (what the contract battery probes)."""
        return {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if "check" in f.metadata}


@dataclass(frozen=True)
class LengthConfig(MethodConfig):
    """The lengths every extending method takes: ``factor`` (target / trained length) or ``target_length``, and
    ``trained_length`` to override what the config says (``original_max_position_embeddings``, else
    ``max_position_embeddings``)."""

    factor: float | None = param(kind=float, ge=1, doc="extension factor: target length / trained length")
    target_length: int | None = param(kind=int, ge=2, doc="the context length to reach (instead of factor)")
    trained_length: int | None = param(kind=int, ge=2, doc="override the trained length read from the config")

    def validate(self) -> None:
        if self.factor is not None and self.target_length is not None and self.trained_length is not None:
            if not math.isclose(self.factor, self.target_length / self.trained_length, rel_tol=1e-9):
                raise ValueError(f"{self.method}: factor={self.factor} and target_length={self.target_length} "
                                 f"disagree for trained_length={self.trained_length}; give one of them")


# ---------------------------------------------------------------------------------------------------------------
# reversible edits as data
# ---------------------------------------------------------------------------------------------------------------
class Action:
    """One reversible edit; ``undo`` takes it back. Subclasses are plain data (they deep-copy and pickle)."""

    def undo(self) -> None:
        raise NotImplementedError


@dataclass(eq=False)
class SetAttr(Action):
    """``obj.name`` was ``old`` (or absent, ``had=False``)."""

    obj: Any
    name: str
    had: bool
    old: Any = None

    def undo(self) -> None:
        if self.had:
            setattr(self.obj, self.name, self.old)
        elif self.name in getattr(self.obj, "__dict__", {}):
            delattr(self.obj, self.name)


@dataclass(eq=False)
class RemoveHook(Action):
    """A hook added with ``register_forward_(pre_)hook``; its handle deep-copies and pickles with the module."""

    handle: Any

    def undo(self) -> None:
        self.handle.remove()


class _Strong:
    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


class Transient:
    """A weak reference to an object outside the model (a tokenizer): followed while it lives, and dropped — not
    copied — when the model is deep-copied or pickled."""

    def __init__(self, obj: Any = None) -> None:
        try:
            self._ref = weakref.ref(obj) if obj is not None else None
        except TypeError:  # an object without weak references: held, still neither copied nor pickled
            self._ref = _Strong(obj)

    def __call__(self) -> Any:
        return self._ref() if self._ref is not None else None

    def __deepcopy__(self, memo: dict) -> Transient:
        return Transient()

    def __reduce__(self) -> tuple:
        return (Transient, ())


@dataclass(eq=False)
class SetLimit(Action):
    """A length limit (``model_max_length``, ``max_seq_length``) raised on an object held by :class:`Transient` or
    directly (``obj``; a sentence-transformers wrapper and its tokenizer)."""

    target: Any  # a Transient, or the object itself
    name: str
    old: Any

    def undo(self) -> None:
        obj = self.target() if isinstance(self.target, Transient) else self.target
        if obj is not None:
            setattr(obj, self.name, self.old)


class FollowCasts(Action):
    """Installed as a module's ``_apply`` (an instance attribute; the class is untouched) while a patch has set
    things aside from it — a replaced submodule, a replaced buffer: they follow every cast and move of the module, so
    that unpatch puts them back as the never-patched module would hold them now. As the undo action it puts them
    back and removes itself. Use :func:`follow_casts`."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.modules: dict[str, torch.nn.Module] = {}
        self.buffers: dict[str, tuple[torch.Tensor, bool]] = {}

    def __call__(self, fn: Any, recurse: bool = True) -> torch.nn.Module:
        type(self.module)._apply(self.module, fn, recurse)
        for aside in self.modules.values():
            aside._apply(fn)
        self.buffers = {n: (fn(t), persistent) for n, (t, persistent) in self.buffers.items()}
        return self.module

    def replace_module(self, name: str, new: torch.nn.Module) -> None:
        self.modules.setdefault(name, getattr(self.module, name))
        setattr(self.module, name, new)

    def replace_buffer(self, name: str, new: torch.Tensor, persistent: bool = False) -> None:
        if name not in self.buffers:
            self.buffers[name] = (self.module._buffers[name], name not in self.module._non_persistent_buffers_set)
        self.module.register_buffer(name, new, persistent=persistent)

    def undo(self) -> None:
        for name, old in self.modules.items():
            setattr(self.module, name, old)
        for name, (old, persistent) in self.buffers.items():
            self.module.register_buffer(name, old, persistent=persistent)
        self.module.__dict__.pop("_apply", None)


def follow_casts(module: torch.nn.Module, undo: Undo) -> FollowCasts:
    """The :class:`FollowCasts` of ``module`` for this patch (installed once)."""
    current = module.__dict__.get("_apply")
    if isinstance(current, FollowCasts):
        return current
    if current is not None:
        raise RuntimeError(f"{type(module).__name__} already has an instance _apply: cannot follow its casts")
    follower = FollowCasts(module)
    module.__dict__["_apply"] = follower
    undo.push(follower)
    return follower


class Undo:
    """Actions taken back last-in first-out (nested edits unwind in order). Plain data: copies with the model."""

    def __init__(self) -> None:
        self.actions: list[Action] = []

    def push(self, action: Action) -> None:
        if not isinstance(action, Action):
            raise TypeError(f"Undo takes Action objects (data that copies with the model), got {type(action)}")
        self.actions.append(action)

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr`` that remembers the old value (or its absence)."""
        own = getattr(obj, "__dict__", None)
        if own is not None and name in own:
            had = True
        elif isinstance(obj, torch.nn.Module) and any(name in d for d in (obj._modules, obj._parameters,
                                                                         obj._buffers)):
            had = True
        else:  # a property with a setter holds a value; a plain class attribute or method is shadowed, then removed
            had = hasattr(getattr(type(obj), name, None), "__set__")
        self.push(SetAttr(obj, name, had, getattr(obj, name, None) if had else None))
        setattr(obj, name, value)

    def hook(self, handle: Any) -> None:
        self.push(RemoveHook(handle))

    def __call__(self) -> None:
        errors = []
        while self.actions:
            try:
                self.actions.pop().undo()
            except Exception as e:  # noqa: BLE001 - undo the rest, then report
                errors.append(e)
        if errors:
            raise errors[0]

    def __len__(self) -> int:
        return len(self.actions)


def privatize_configs(model: torch.nn.Module, undo: Undo) -> Any:
    """Give every module of ``model`` that holds a transformers config its own deep copy (one memo: sub-configs stay
    linked), so that a patch never writes into a config object another model shares; ``undo`` puts the originals
    back. Returns the model's own (new) config."""
    from transformers import PretrainedConfig

    holders = [m for m in model.modules() if isinstance(m.__dict__.get("config"), PretrainedConfig)]
    originals = {id(m.config): m.config for m in holders}
    copies = copy.deepcopy(list(originals.values()), {})
    mapping = dict(zip(originals, copies))
    for m in holders:
        undo.setattr(m, "config", mapping[id(m.config)])
    return model.config


# ---------------------------------------------------------------------------------------------------------------
# what a patch applied
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Applied:
    """What a method's ``apply`` resolved (its edits went onto the undo it was given)."""

    params: dict[str, Any]
    trained_length: int | None
    target_length: int | None
    factor: float | None
    layer_types: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    reload: dict[str, Any] | None = None  # parameters that re-apply the method to a saved copy (default: params)
    form: str | None = None  # the export form where it differs from the method's (a config class that refuses it)


@dataclass
class PatchInfo:
    """What ``longctx.patch`` applied: the method, its resolved parameters, the trained and target length."""

    method: str
    params: dict[str, Any]
    trained_length: int | None
    target_length: int | None
    factor: float | None
    layer_types: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    evidence: dict[str, Any] | None = None  # what chose the method (``longctx.patch(model, "auto", …)``)
    form: str = ""  # how a save or export writes it: "config", "longctx" or "weights"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        where = f", layers {self.layer_types}" if self.layer_types else ""
        extra = {k: v for k, v in self.params.items() if k not in ("factor", "target_length", "trained_length")}
        shown = ", ".join(f"{k}={v}" for k, v in extra.items())
        factor = f"factor {self.factor:g}" if self.factor is not None else "no fixed factor"
        return (
            f"longctx: {self.method} applied: trained {self.trained_length} -> target {self.target_length} "
            f"({factor}{', ' + shown if shown else ''}{where})"
        )


@dataclass(eq=False)
class PatchState:
    """Kept on a patched model as ``_longctx_state``: what was applied, how to take it back, how to apply it again.

    ``request``: the method and parameters ``patch`` was called with (re-applies this patch to this model);
    ``record``: the ``{"method", "params"}`` that re-apply it to a saved copy (the ``longctx`` config block)."""

    info: PatchInfo
    request: dict[str, Any]
    record: dict[str, Any]
    undo: Undo
    tokenizer: Transient = field(default_factory=Transient)


class ReachWarning:
    """A forward pre-hook on a patched model: the first input past the target length the patch was set up for
    gets a warning naming the method, the length and what to do (once per patched model; plain data)."""

    def __init__(self, method: str, target: int) -> None:
        self.method, self.target, self.warned = method, target, False

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.warned:
            return
        n = input_length(args, kwargs)
        if n is not None and n > self.target:
            self.warned = True
            import warnings

            warnings.warn(f"longctx: an input of {n} tokens is past the {self.method} patch's target length "
                          f"{self.target}: positions past it are not extended as set up; patch with "
                          f"target_length >= {n}", stacklevel=2)


def input_length(args: tuple, kwargs: dict) -> int | None:
    """The sequence length a forward reaches (cached tokens + this call's), from shapes and the cache's own count —
    no device sync on a GPU's hot path (a count held on the device is not read: None)."""
    tokens = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if tokens is None:
        embeds = kwargs.get("inputs_embeds")
        tokens = embeds[..., 0] if isinstance(embeds, torch.Tensor) else None
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        return None
    past = 0
    for value in kwargs.values():
        length = getattr(value, "get_seq_length", None)
        if callable(length):
            past = length()
            break
    if isinstance(past, torch.Tensor):
        if past.device.type != "cpu":
            return None
        past = int(past)
    return int(past) + tokens.shape[-1]


# ---------------------------------------------------------------------------------------------------------------
# small helpers several methods use
# ---------------------------------------------------------------------------------------------------------------
def real_key_lengths(attention_mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor:
    """Keys each row attends to (its real tokens), ``[batch]``: from a 4-D bool (True = attend) or additive float
    mask (a key any query of the row may see), a 2-D ``[B, kv]`` padding mask (flash attention's; 1 = real), or
    ``kv_len`` for every row without a mask."""
    if attention_mask is None:
        return torch.full((batch,), kv_len)
    if attention_mask.dim() == 2:
        return attention_mask.bool().sum(-1)
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return allowed.any(dim=-2).any(dim=1).sum(-1).expand(batch)

