"""``longctx.search`` (floor 5): a method's parameters searched at a target length on perplexity, bounded by a time
budget. What is searched is the method's own declaration (``Method.tune``, ``longctx.patches.space``); this module
names no method.

* **LongRoPE** (Ding et al., ICML 2024; ``longrope``): per-dimension frequency factors λ_i, monotone
  1 ≤ λ_0 ≤ … ≤ s, and the attention factor; seeds PI, NTK and YaRN written per dimension, then (as LongRoPE starts)
  a first population of mutations of the best two seeds; optuna's genetic sampler (NSGA-II: tournament selection,
  crossover, mutation — LongRoPE's operators).
* **The attention methods** (SelfExtend's window, DCA's chunk and local window, ReRoPE's window, STRING's S and W, …):
  a few integer / float / choice parameters; seed the method's defaults at the length; optuna's TPE sampler.

Either way: the seeds run first, exactly as declared, so the result is never worse than the best of them on the
search text; reproducible with ``seed``; stopped by ``budget_s`` (the trial running when the budget runs out
finishes) or ``max_trials``. A candidate the method refuses (it cannot reach the length) is listed as infeasible.
**Score**: perplexity at N on windows of the text, the model patched with each candidate and unpatched after.

Hand-written: only the loop around optuna (seeds as completed trials, infeasible candidates, the budget); the search
itself is optuna's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import longctx

from .perplexity import perplexity, token_ids

__all__ = ["SearchResult", "search", "searchable"]


@dataclass
class SearchResult:
    """What :func:`search` evaluated: every candidate (seeds first), the best, the budget and the time spent."""

    method: str
    target_length: int
    trained_length: int
    measured: str  # what the score is
    rows: list[dict[str, Any]]  # one per candidate: trial, source, ppl (None: refused), params, resolved, seconds
    best: dict[str, Any]
    budget_s: float
    seconds: float
    stopped: str  # why the search stopped
    seed: int
    params: dict[str, Any] = field(default_factory=dict)  # the winner as longctx.patch parameters
    space: str = ""  # what was searched

    def patch_line(self) -> str:
        return f'longctx.patch(model, "{self.method}", **result.params)  # {_short(self.best)}'

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(row: dict) -> str:
    return f"{row['source']}: ppl {row['ppl']:.3f}"


def searchable() -> list[str]:
    """The methods that declare a search space (``Method.tune``)."""
    from longctx.patches import registry

    return [name for name, spec in registry.items() if spec.tune is not None]


def search(model: Any, method: str = "longrope", *, target_length: int, tokenizer: Any = None, text: str | None = None,
           budget_s: float = 600.0, max_trials: int | None = None, windows: int = 2, seed: int = 0,
           population: int = 8, log: Any = None, ids: Any = None) -> SearchResult:
    """Search ``method``'s parameters for ``model`` at ``target_length`` on ``text`` (see the module docstring).

    ``windows``: windows of N tokens the perplexity is measured on (the text must hold them); ``budget_s``: seconds
    the search may take (the seeds always run); ``max_trials``: a cap on candidates (seeds included); ``seed``: the
    sampler's seed (same seed, same text, same model: the same candidates); ``population``: the genetic sampler's
    population; ``ids``: the text's token ids instead of ``text``. Returns a :class:`SearchResult`; the model is
    left as it was. Bad arguments raise ``ValueError`` before any measurement.
    """
    import optuna
    from optuna.trial import create_trial

    from longctx.patches import registry

    methods = searchable()
    spec = registry.get(method) if isinstance(method, str) else None
    if spec is None or spec.tune is None:
        raise ValueError(f"longctx.search searches {', '.join(methods)}; got {method!r}")
    if not isinstance(target_length, int) or isinstance(target_length, bool):
        raise ValueError(f"target_length must be an integer, got {target_length!r}")
    if not budget_s > 0:
        raise ValueError(f"budget_s must be a number of seconds > 0, got {budget_s!r}")
    if max_trials is not None and max_trials < 1:
        raise ValueError(f"max_trials must be >= 1, got {max_trials}")
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    if longctx.is_patched(model):
        raise ValueError("search a model as it was trained: longctx.unpatch(model) first")
    info = longctx.inspect(model)
    if not spec.applies_to(info):
        raise ValueError(f"{method} does not apply to {type(model).__name__} ({info.position_encoding})")
    L = info.trained_length
    if target_length <= L:
        raise ValueError(f"target_length={target_length} is not longer than the trained length {L}")
    space = spec.tune(model, target_length)
    if ids is None:
        if tokenizer is None or text is None:
            raise ValueError("search needs the text (and the model's tokenizer) to measure perplexity on")
        ids = token_ids(tokenizer, text)
    if ids.numel() < target_length * windows:
        raise ValueError(f"the search text has {ids.numel()} tokens, fewer than {windows} window(s) of "
                         f"{target_length}; give a longer text or fewer windows")
    log = log or (lambda line: None)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def score(params: dict[str, Any], source: str) -> float | None:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"trial": len(rows), "source": source, "ppl": None, "params": params}
        try:
            with longctx.patched(model, method, tokenizer=tokenizer, **params) as applied:
                row["resolved"] = {k: v for k, v in applied.params.items()
                                   if not isinstance(v, list) and k not in ("attn_backend", "trained_length")}
                row["ppl"] = perplexity(model, ids, target_length, max_windows=windows, progress=False).ppl
        except ValueError as e:  # the method refuses these parameters (cannot reach N, S <= W …): infeasible
            row["why"] = " ".join(str(e).split())
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in {**params, **row.get("resolved", {})}.items()
                          if k not in ("target_length", "factor") and not isinstance(v, list))
        figure = f"ppl {row['ppl']:.4f}" if row["ppl"] is not None else f"refused ({row['why'][:80]})"
        log(f"{len(rows):>3} {source:<8} {figure}  {shown}  [{row['seconds']:.1f} s]")
        return row["ppl"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.NSGAIISampler(seed=seed, population_size=population) if space.genetic else
               optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(6, 2 * len(space.dims))))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    distributions = {name: t.distribution() for name, t in space.dims.items()}

    def objective(trial: Any) -> float:
        sampled = {name: t.suggest(trial, name) for name, t in space.dims.items()}
        ppl = score(space.candidate(sampled), "search")
        if ppl is None:
            raise optuna.TrialPruned()
        return ppl

    def told(values: dict[str, Any] | None, ppl: float | None, source: str) -> None:
        """A candidate measured outside the sampler, added as a finished trial it learns from (for the genetic
        sampler, as a member of its first generation: LongRoPE's initial population)."""
        if ppl is None or values is None:
            return
        first = {sampler._get_generation_key(): 0} if space.genetic else {}
        study.add_trial(create_trial(params=values, distributions=distributions, value=ppl,
                                     user_attrs={"source": source}, system_attrs=first))

    for name, params in space.seeds.items():  # the seeds always run first: never worse than the best of them
        ppl = score({**space.fixed, **params}, name)
        told(space.sampled({**params, **rows[-1].get("resolved", {})}), ppl, name)
    if space.genetic:  # the rest of the first population: mutations of the best two seeds, not uniform draws
        best_two = sorted((t for t in study.trials if t.value is not None), key=lambda t: t.value)[:2]
        for values in _mutations([t.params for t in best_two], space.dims, population - len(space.seeds), seed):
            if time.perf_counter() - start >= budget_s or (max_trials is not None and len(rows) >= max_trials):
                break
            told(values, score(space.candidate(values), "mutation"), "mutation")

    remaining = budget_s - (time.perf_counter() - start)
    more = (max_trials - len(rows)) if max_trials is not None else 10_000
    if remaining > 0 and more > 0:
        study.optimize(objective, n_trials=more, timeout=remaining)
    seconds = time.perf_counter() - start
    stopped = (f"max_trials ({max_trials}) reached" if max_trials is not None and len(rows) >= max_trials else
               f"budget ({budget_s:.0f} s) reached: the trial running then finished" if seconds >= budget_s else
               "every trial asked for ran")
    feasible = [r for r in rows if r["ppl"] is not None]
    if not feasible:
        raise ValueError(f"{method}: no candidate could be patched at {target_length} tokens: "
                         + "; ".join(sorted({r['why'] for r in rows}))[:400])
    best = min(feasible, key=lambda r: r["ppl"])
    result = SearchResult(method, target_length, L, f"perplexity at {target_length} tokens, {windows} window(s) of "
                          f"the search text ({windows * target_length} tokens)", rows, best, budget_s, seconds,
                          stopped, seed, dict(best["params"]), space.note)
    return result


def _mutations(parents: list[dict[str, Any]], dims: dict[str, Any], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` mutations of the parents (in turn): each numeric value moved by a normal step of a tenth of its
    range, clipped to it; choices kept. Reproducible with ``seed``."""
    import random

    if not parents:
        return []
    rng = random.Random(seed)
    out = []
    for k in range(count):
        values = {}
        for name, value in parents[k % len(parents)].items():
            t = dims[name]
            if t.choices:
                values[name] = value
                continue
            moved = min(max(value + rng.gauss(0.0, 0.1 * (t.high - t.low)), t.low), t.high)
            values[name] = int(round(moved)) if t.kind is int else moved
        out.append(values)
    return out


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
