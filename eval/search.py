"""``longctx.search`` (floor 5): LongRoPE's search for per-dimension frequency factors, bounded by a time budget.

LongRoPE (Ding et al., ICML 2024) finds the factors λ_i of a model at a target length N by an evolutionary search
on perplexity, without fine-tuning. Here:

* **Seeds**: PI (λ_i = s), static NTK (λ_i = s^(2i/(d−2))) and YaRN (the factor its NTK-by-parts ramp gives each
  dimension, with its temperature 0.1·ln s + 1) — the standard methods' frequencies written per dimension, evaluated
  first; the result is never worse than the best of them on the search text (they are candidates too).
* **Space**: monotone factors 1 ≤ λ_0 ≤ λ_1 ≤ … ≤ s (LongRoPE's constraint: slower dimensions are interpolated at
  least as much), written as λ_0 = s^x_0 and log λ_i = log λ_{i−1} + u_i·(ln s − log λ_{i−1}) with x_0, u_i ∈ [0, 1],
  and the attention factor in [1, 1.5].
* **Search**: optuna's genetic sampler (NSGA-II: tournament selection, crossover, mutation — LongRoPE's operators),
  seeded with the seeds, reproducible with ``seed``; stopped by ``budget_s`` (the trial running when the budget runs
  out finishes) or ``max_trials``.
* **Score**: perplexity at N on windows of the text (the model patched with ``longrope`` per candidate, and
  unpatched after).

Hand-written: only the mapping between factors and the sampler's unit cube; the search itself is optuna's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import longctx
from longctx.core.rope import default_inv_freq, ntk_factors, yarn_inv_freq
from longctx.models import find_rotary_modules, layer_params, rotary_dim, trained_length

from .perplexity import perplexity, token_ids

__all__ = ["SearchResult", "search", "seeds", "encode", "decode"]

METHODS = ("longrope",)  # what longctx.search searches today
ATTENTION_RANGE = (1.0, 1.5)


@dataclass
class SearchResult:
    """What :func:`search` evaluated: every candidate (seeds first), the best, the budget and the time spent."""

    method: str
    target_length: int
    trained_length: int
    measured: str  # what the score is
    rows: list[dict[str, Any]]  # one per candidate: source, ppl, attention_factor, long_factor, seconds
    best: dict[str, Any]
    budget_s: float
    seconds: float
    stopped: str  # why the search stopped
    seed: int
    params: dict[str, Any] = field(default_factory=dict)  # the winner as longctx.patch parameters

    def patch_line(self) -> str:
        return f'longctx.patch(model, "{self.method}", **result.params)  # {_short(self.best)}'

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(row: dict) -> str:
    return f"{row['source']}: ppl {row['ppl']:.3f}, attention_factor {row['attention_factor']:.3f}"


def seeds(rotary: int, theta: float, factor: float, trained: int) -> dict[str, tuple[list[float], float]]:
    """``{name: (long_factor, attention_factor)}`` of PI, NTK and YaRN written per dimension (``rotary`` dims)."""
    half = rotary // 2
    base = default_inv_freq(rotary, theta).double()
    yarn = yarn_inv_freq(rotary, theta, factor, trained).double()
    yarn_factors = [max(1.0, min(factor, float(x))) for x in (base / yarn)]
    default_attention = math.sqrt(1 + math.log(factor) / math.log(trained)) if factor > 1 else 1.0
    return {
        "pi": ([float(factor)] * half, default_attention),
        "ntk": (ntk_factors(rotary, factor), default_attention),
        "yarn": (yarn_factors, 0.1 * math.log(factor) + 1),
    }


def encode(factors: list[float], s: float) -> list[float]:
    """Monotone factors in [1, s] → the sampler's unit cube (x_0, u_1 … u_{h−1}); :func:`decode` inverts it."""
    top = math.log(s)
    logs = [min(max(math.log(max(f, 1.0)), 0.0), top) for f in factors]
    out = [logs[0] / top if top > 0 else 0.0]
    previous = logs[0]
    for value in logs[1:]:
        value = max(value, previous)  # made monotone
        room = top - previous
        out.append((value - previous) / room if room > 1e-12 else 0.0)
        previous = value
    return [min(max(x, 0.0), 1.0) for x in out]


def decode(unit: list[float], s: float) -> list[float]:
    top = math.log(s)
    current = unit[0] * top
    logs = [current]
    for u in unit[1:]:
        current = current + u * (top - current)
        logs.append(current)
    return [math.exp(v) for v in logs]


def search(model: Any, method: str = "longrope", *, target_length: int, tokenizer: Any, text: str,
           budget_s: float = 600.0, max_trials: int | None = None, windows: int = 2, seed: int = 0,
           population: int = 8, log: Any = None) -> SearchResult:
    """Search ``method``'s parameters for ``model`` at ``target_length`` on ``text`` (see the module docstring).

    ``windows``: windows of N tokens the perplexity is measured on (the text must hold them); ``budget_s``: seconds
    the search may take (the seeds always run); ``max_trials``: a cap on candidates (seeds included); ``seed``: the
    sampler's seed (same seed, same text, same model: the same candidates). Returns a :class:`SearchResult`; the
    model is left as it was.
    """
    import optuna

    if method not in METHODS:
        raise ValueError(f"longctx.search searches {', '.join(METHODS)}; got {method!r}")
    if not isinstance(target_length, int) or isinstance(target_length, bool):
        raise ValueError(f"target_length must be an integer, got {target_length!r}")
    if not budget_s > 0:
        raise ValueError(f"budget_s must be a number of seconds > 0, got {budget_s!r}")
    if max_trials is not None and max_trials < 1:
        raise ValueError(f"max_trials must be >= 1, got {max_trials}")
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    rotaries = find_rotary_modules(model)
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no rotary position embeddings: longrope searches RoPE factors")
    if longctx.is_patched(model):
        raise ValueError("search a model as it was trained: longctx.unpatch(model) first")
    config = rotaries[0].config
    L = trained_length(config)
    if target_length <= L:
        raise ValueError(f"target_length={target_length} is not longer than the trained length {L}")
    layer_types = [lt for lt in (config.rope_parameters if any(isinstance(v, dict) for v in
                                                               config.rope_parameters.values()) else {})]
    params = layer_params(config, "full_attention" if "full_attention" in layer_types else None)
    d = rotary_dim(config, params)
    s = target_length / L
    ids = token_ids(tokenizer, text)
    if ids.numel() < target_length * windows:
        raise ValueError(f"the search text has {ids.numel()} tokens, fewer than {windows} window(s) of "
                         f"{target_length}; give a longer text or fewer windows")
    log = log or (lambda line: None)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def score(long_factor: list[float], attention: float, source: str) -> float:
        t0 = time.perf_counter()
        with longctx.patched(model, "longrope", target_length=target_length, long_factor=long_factor,
                             attention_factor=attention):
            ppl = perplexity(model, ids, target_length, max_windows=windows, progress=False).ppl
        row = {"trial": len(rows), "source": source, "ppl": ppl, "attention_factor": attention,
               "long_factor": [round(x, 6) for x in long_factor], "seconds": time.perf_counter() - t0}
        rows.append(row)
        log(f"{len(rows):>3} {source:<8} ppl {ppl:.4f}  attention {attention:.3f}  [{row['seconds']:.1f} s]")
        return ppl

    seeded = seeds(d, params["rope_theta"], s, L)
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    names = [f"x{i}" for i in range(d // 2)]
    for name, (factors, attention) in seeded.items():
        study.enqueue_trial({**dict(zip(names, encode(factors, s))), "attention": attention},
                            user_attrs={"source": name})

    def objective(trial: Any) -> float:
        unit = [trial.suggest_float(n, 0.0, 1.0) for n in names]
        attention = trial.suggest_float("attention", *ATTENTION_RANGE)
        source = trial.user_attrs.get("source", "search")
        factors = seeded[source][0] if source in seeded else decode(unit, s)  # seeds exactly as defined
        return score(factors, attention, source)

    study.optimize(objective, n_trials=len(seeded))  # the seeds always run: never worse than the best of them
    remaining = budget_s - (time.perf_counter() - start)
    more = (max_trials - len(seeded)) if max_trials is not None else 10_000
    if remaining > 0 and more > 0:
        study.optimize(objective, n_trials=more, timeout=remaining)
    seconds = time.perf_counter() - start
    stopped = (f"max_trials ({max_trials}) reached" if max_trials is not None and len(rows) >= max(max_trials, 3) else
               f"budget ({budget_s:.0f} s) reached: the trial running then finished" if seconds >= budget_s else
               "every trial asked for ran")
    best = min(rows, key=lambda r: r["ppl"])
    result = SearchResult(method, target_length, L, f"perplexity at {target_length} tokens, {windows} window(s) of "
                          f"the search text ({windows * target_length} tokens)", rows, best, budget_s, seconds,
                          stopped, seed)
    result.params = {"target_length": target_length, "long_factor": best["long_factor"],
                     "attention_factor": best["attention_factor"]}
    return result

