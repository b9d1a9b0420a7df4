"""What a method's parameters may be tuned over: the search space a method declares (``Method.tune``), read by
``longctx.search`` and ``longctx recommend`` (floor 5), which name no method.

A method declares ``tune(model, target_length) -> SearchSpace``: the parameters to explore (:class:`Tunable`: an
integer or float range, on a log scale where the parameter is a length, or a few choices), the seeds evaluated first
(its defaults at that length: the search is never worse than them on its text), the parameters passed with every
candidate (the target length), and — for a space that is not the parameters themselves, as LongRoPE's per-dimension
factors — how the sampler's values map to patch parameters and back. It raises ``ValueError`` where the method
cannot reach the target length at all (STRING past 2L), naming why.

A candidate the method refuses (a window that cannot reach the target, S <= W) is recorded as infeasible: the patch's
own validation is the constraint, written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Tunable", "SearchSpace", "rope_trained_length"]


@dataclass(frozen=True)
class Tunable:
    """One parameter's range: ``low`` … ``high`` (``kind`` int or float, ``log`` for a log scale), or ``choices``."""

    low: float = 0.0
    high: float = 0.0
    kind: type = int
    log: bool = False
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not self.choices and not self.low <= self.high:
            raise ValueError(f"Tunable: low ({self.low}) must not exceed high ({self.high})")

    def distribution(self) -> Any:
        """optuna's distribution for it."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices:
            return CategoricalDistribution(list(self.choices))
        if self.kind is int:
            return IntDistribution(int(self.low), int(self.high), log=self.log and self.low >= 1)
        return FloatDistribution(float(self.low), float(self.high), log=self.log and self.low > 0)

    def suggest(self, trial: Any, name: str) -> Any:
        """A value drawn by an optuna trial."""
        if self.choices:
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind is int:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log and self.low >= 1)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log and self.low > 0)

    def contains(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass
class SearchSpace:
    """A method's search space at one target length (see the module docstring)."""

    dims: dict[str, Tunable]
    seeds: dict[str, dict[str, Any]]  # name -> patch parameters, evaluated first exactly as given
    fixed: dict[str, Any] = field(default_factory=dict)  # passed with every candidate (the target length)
    decode: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # sampled values -> patch parameters
    encode: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # patch parameters -> sampled values
    genetic: bool = False  # many coupled dimensions (LongRoPE's factors): NSGA-II; else TPE
    note: str = ""  # one line on what is searched

    def candidate(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """The patch parameters of sampled values (a None value: the method's default, left out)."""
        params = {**self.fixed, **(self.decode(sampled) if self.decode else sampled)}
        return {k: v for k, v in params.items() if v is not None}

    def sampled(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """The sampler's values of patch parameters (a seed, resolved), or None where they fall outside the space."""
        values = self.encode(params) if self.encode else {k: params.get(k) for k in self.dims}
        if set(values) != set(self.dims) or not all(self.dims[k].contains(v) for k, v in values.items()):
            return None
        return values


def rope_trained_length(model: Any, method: str) -> int:
    """The trained length of a model with rotary embeddings (a ``ValueError`` naming ``method`` otherwise)."""
    from longctx.models import find_rotary_modules, trained_length, unwrap

    rotaries = find_rotary_modules(unwrap(model))
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no rotary position embeddings: {method} tunes RoPE positions")
    return trained_length(rotaries[0].config)
