"""Which method, with which parameters, for this model at this length? A short, bounded sweep with the evidence.

:func:`recommend` patches the model with every method that applies to it — each variant the method declares
(``Method.examples``, retargeted to the length asked for) — and measures, at the target length N:

* decoders: perplexity on one window of N tokens of a text (the bundled *Emma* by default), passkey retrieval
  by generation at three depths and — when the budget allows — a RULER subset at N (:data:`RULER_SUBSET`, one
  sample per task, the same inputs for every candidate); ranked by the RULER average, then passkey accuracy, then
  perplexity (without RULER: passkey, then perplexity);
* embedding models: LongEmbed's synthetic passkey and needle retrieval at N (``docs`` documents each); ranked by
  their mean top-1 accuracy, then passkey.

The model as it is (``vanilla`` / ``truncate``) is measured first, as the reference. A time budget bounds the run:
once the next candidate would pass it (estimated from the slowest one so far), the rest are listed as not measured.

**RULER's place** (``ruler=None``, the default): decided once, on the reference, so every candidate is ranked on the
same evidence — RULER is measured on the reference when perplexity and passkey leave room for it, and kept for
the candidates only if the reference's full time × the candidates still fits the ranking's share of the budget;
otherwise the ranking is passkey and perplexity alone and ``measured["ruler"]`` says why (the choice depends on the
machine's speed, and says so). ``ruler=True`` always measures it (the budget then bounds the candidates as usual),
``ruler=False`` never. Subset tasks whose RULER input cannot fit N tokens of the tokenizer are left out (named).

**Tuning** (decoders): with the budget left after the ranking (which stops at 60 % of it), the ``tune`` best-ranked methods that declare a search
space (``Method.tune``: SelfExtend's G and W, DCA's chunk and window, ReRoPE's window, STRING's S and W, LongRoPE's
factors) are searched by ``longctx.search`` on perplexity at N — on the text's second window of N tokens where the
text holds one, so the evidence window stays out of the tuning — each with an equal share of what is left. A tuned
candidate that beats the method's defaults on the tuning window is then measured like every other candidate and
ranked with them (``tuned`` in its row); ``Recommendation.tuning`` says what each search tried.
:func:`auto_patch` (``longctx.patch(model, "auto", target_length=N)``) applies the winner and keeps the evidence
in its ``PatchInfo``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Recommendation", "candidates", "recommend", "auto_patch", "NoImprovement", "RULER_SUBSET"]

TUNING_SHARE = 0.4  # of the budget kept for tuning (decoders, tune > 0): the ranking stops at the rest
# one RULER task per kind: a needle in an essay, needles among distractors, several values, multi-hop tracing,
# aggregation (RULER's QA tasks need data not available offline)
RULER_SUBSET = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "fwe")


@dataclass
class Recommendation:
    """The ranked evidence of :func:`recommend`."""

    target_length: int
    trained_length: int
    kind: str  # "decoder" | "encoder"
    measured: dict[str, Any]  # what each candidate was measured on (lengths, tokens, trials, documents)
    rows: list[dict[str, Any]]  # one per candidate measured, best first; the reference row has rank None
    not_measured: list[dict[str, Any]] = field(default_factory=list)  # candidates the budget left out
    seconds: float = 0.0
    improves: bool = True  # the winner measured better than the model as it is (the reference row)
    tuning: list[dict[str, Any]] = field(default_factory=list)  # one per method searched: candidates, seconds, best

    @property
    def winner(self) -> dict[str, Any]:
        return next(r for r in self.rows if r["rank"] == 1)

    def patch_line(self) -> str:
        """The one line that applies the winner."""
        args = "".join(f", {k}={v!r}" for k, v in self.winner["params"].items())
        return f'longctx.patch(model, "{self.winner["method"]}"{args})'

    def export_line(self, model: str, out: str = "OUT") -> str:
        """The export command of the winner."""
        params = dict(self.winner["params"])
        target = params.pop("target_length", self.target_length)
        extra = "".join(f" --param {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items())
        return f"longctx export {model} {out} --method {self.winner['method']} --target-length {target}{extra}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "winner": self.winner}


def candidates(model: Any, target_length: int) -> list[tuple[str, dict[str, Any]]]:
    """Every method that applies to ``model`` with each variant it declares, patched to ``target_length``."""
    import longctx
    from longctx.patches import registry

    info = longctx.inspect(model)
    out: list[tuple[str, dict[str, Any]]] = []
    for spec in registry.values():
        if not spec.applies_to(info):
            continue
        for example in spec.examples(info.trained_length):
            params = {k: v for k, v in example.items() if k not in ("factor", "target_length", "max_factor")}
            if "max_factor" in example:  # a method sized by its largest factor (CLEX): the one N needs
                params["max_factor"] = max(2, -(-target_length // info.trained_length))
            params["target_length"] = target_length
            if (spec.name, params) not in out:
                out.append((spec.name, params))
    return out


def _decoder_evidence(model: Any, tokenizer: Any, ids: Any, n: int, depths: list[float]) -> dict[str, Any]:
    from .passkey import passkey_grid
    from .perplexity import perplexity

    ppl = perplexity(model, ids, n, max_windows=1, progress=False)
    trials = passkey_grid(model, tokenizer, [n - 16], depths, progress=False)
    return {"ppl": ppl.ppl, "passkey": sum(t.correct for t in trials) / len(trials)}


def _ruler_evidence(model: Any, tokenizer: Any, samples: list[Any]) -> dict[str, Any]:
    """RULER's scores of ``samples`` as fractions: ``ruler`` (their mean) and ``ruler_tasks`` (one per task)."""
    from .ruler import run_samples

    scores = {s.task: v / 100 for s, v in zip(samples, run_samples(model, tokenizer, samples))}
    return {"ruler": sum(scores.values()) / len(scores), "ruler_tasks": scores}


def _ruler_samples(tokenizer: Any, n: int) -> tuple[list[Any], list[str]]:
    """One input of each :data:`RULER_SUBSET` task at ``n`` tokens (RULER's seed for sample 0 at n), and the tasks
    whose input cannot fit ``n`` tokens of this tokenizer, each with why."""
    from .ruler import ruler_sample, sample_seed

    samples, unfit = [], []
    for task in RULER_SUBSET:
        try:
            samples.append(ruler_sample(task, n, tokenizer, sample_seed(0, n, 0)))
        except ValueError as e:
            unfit.append(str(e))
    return samples, unfit


def _encoder_evidence(embedder: Any, tasks: list[Any]) -> dict[str, Any]:
    from .retrieval import evaluate

    scores = {task.name: evaluate(embedder, task, ks=(1,))[0]["ndcg@1"] for task in tasks}
    return {**scores, "retrieval": sum(scores.values()) / len(scores)}


def recommend(model: Any, target_length: int, *, tokenizer: Any = None, text: str | None = None,
              budget_s: float = 600.0, docs: int = 8, methods: list[str] | None = None,
              log: Any = None, tune: int = 2, tune_trials: int | None = None,
              ruler: bool | None = None) -> Recommendation:
    """Measure every candidate (:func:`candidates`, or only ``methods``) at ``target_length`` and rank them.

    ``text``: the decoder's perplexity text (default: the bundled *Emma*); ``budget_s``: seconds the sweep may take
    (the reference and the first candidate always run); ``docs``: documents per synthetic retrieval task (encoders);
    ``log(line)``: called with one line per finished candidate; ``tune``: how many of the best-ranked methods with a
    search space are tuned with the budget left (decoders; 0: rank only); ``tune_trials``: at most this many candidates
    per tuned method (seeds included; default: as many as its share of the budget allows); ``ruler`` (decoders): the
    RULER subset in the evidence — ``None`` when the budget allows (module docstring), ``True`` always, ``False``
    never. A patched model is measured without its patch (the reference is the model as trained), which comes back
    afterwards. Bad arguments raise ``ValueError`` before any measurement.
    """
    from longctx.api import unpatched
    from longctx.patches import registry

    start = time.perf_counter()
    if isinstance(target_length, bool) or not isinstance(target_length, int):
        raise ValueError(f"target_length must be an integer number of tokens, got {target_length!r}")
    if not budget_s > 0:
        raise ValueError(f"budget_s must be a number of seconds > 0, got {budget_s!r}")
    if isinstance(docs, bool) or not isinstance(docs, int) or docs < 2:
        raise ValueError(f"docs must be an integer >= 2 (documents per retrieval task), got {docs!r}")
    if isinstance(tune, bool) or not isinstance(tune, int) or tune < 0:
        raise ValueError(f"tune must be an integer >= 0 (methods to tune; 0: rank only), got {tune!r}")
    if tune_trials is not None and (isinstance(tune_trials, bool) or not isinstance(tune_trials, int)
                                    or tune_trials < 1):
        raise ValueError(f"tune_trials must be an integer >= 1 (candidates per tuned method), got {tune_trials!r}")
    if ruler not in (None, True, False):
        raise ValueError(f"ruler must be None (when the budget allows), True or False, got {ruler!r}")
    unknown = [m for m in methods or [] if m not in registry]
    if unknown:
        raise ValueError(f"methods: unknown method(s) {unknown}; available: {', '.join(registry)}")
    with unpatched(model):  # measured from the model as it was trained; a patch it had comes back afterwards
        return _recommend(model, target_length, tokenizer, text, budget_s, docs, methods, log, start,
                          (tune, tune_trials), ruler)


def _recommend(model: Any, target_length: int, tokenizer: Any, text: str | None, budget_s: float, docs: int,
               methods: list[str] | None, log: Any, start: float, tuning_plan: tuple[int, int | None],
               ruler: bool | None) -> Recommendation:
    import longctx
    from longctx.models import unwrap
    from longctx.patches import get_method, registry

    from .runner import params_key
    from .synthetic import default_haystack

    tune, tune_trials = tuning_plan
    info = longctx.inspect(model)
    trained, n = info.trained_length, int(target_length)
    if n <= trained:
        raise ValueError(f"target_length ({n}) must be longer than the trained length ({trained})")
    todo, skipped = [], []
    for method, params in candidates(model, n):  # each tried before any measurement: a variant that cannot reach
        if methods is not None and method not in methods:  # N (a fixed window or group) is listed, not run
            continue
        try:
            with longctx.patched(model, method, tokenizer=tokenizer, **params):
                pass
            todo.append((method, params))
        except ValueError as e:
            skipped.append({"method": method, "params": params, "why": " ".join(str(e).split())})
    if not todo:
        raise ValueError(f"no method applies to this model at {n} tokens"
                         f"{' among ' + ', '.join(methods) if methods else ''}"
                         + "".join(f"; {s['method']}: {s['why']}" for s in skipped))
    log = log or (lambda line: None)
    depths = [0.25, 0.5, 0.75]
    ranking_s = budget_s * (1 - TUNING_SHARE) if tune and info.kind == "decoder" else budget_s
    if ruler and info.kind != "decoder":
        raise ValueError("ruler=True: RULER measures decoders (generation); an embedding model is ranked by retrieval")
    if info.kind == "decoder":
        from .perplexity import token_ids

        if tokenizer is None:
            raise ValueError("a decoder needs its tokenizer to be measured (perplexity and passkey)")
        ids = token_ids(tokenizer, text if text is not None else default_haystack())
        if ids.numel() < n:
            raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {n}")
        measured = {"perplexity": f"one window of {n} tokens", "passkey": f"generation at {n - 16} tokens, depths "
                    f"{depths}, one trial each", "rank_by": "passkey accuracy, then perplexity"}
        tune_ids = ids[n:2 * n] if ids.numel() >= 2 * n else ids[:n]
        if tune:
            measured["tuning"] = (f"perplexity on the text's second window of {n} tokens (apart from the evidence)"
                                  if ids.numel() >= 2 * n else f"perplexity on the evidence window (the text holds "
                                  f"one window of {n} tokens)")
        reference = "vanilla"

        plan: dict[str, Any] = {"on": False, "samples": None}
        if ruler:  # asked for: its inputs built (and refused) before any measurement
            plan["samples"] = _ruler_samples(tokenizer, n)
            if not plan["samples"][0]:
                raise ValueError(f"ruler=True: no task of the RULER subset fits {n} tokens of this tokenizer ("
                                 + "; ".join(plan["samples"][1]) + ")")

        def evidence(applied: Any) -> dict[str, Any]:
            found = _decoder_evidence(unwrap(model), tokenizer, ids, n, depths)
            if plan["on"]:
                found.update(_ruler_evidence(unwrap(model), tokenizer, plan["samples"][0]))
            return found

        def order(row: dict) -> tuple:
            return (-row["ruler"], -row["passkey"], row["ppl"]) if plan["on"] else (-row["passkey"], row["ppl"])

        def add_ruler(row: dict) -> None:
            """RULER's place in the evidence, decided on the reference ``row`` (module docstring)."""
            base, count = row["seconds"], len(todo)
            if ruler is None and base * (1 + count) > ranking_s - (time.perf_counter() - start):
                measured["ruler"] = (f"left out by the budget: perplexity and passkey alone took {base:.0f} s on "
                                     f"the reference, no room for more per candidate ({count} candidates)")
                return
            samples, unfit = plan["samples"] or _ruler_samples(tokenizer, n)
            if not samples:
                measured["ruler"] = f"left out: no task of the subset fits {n} tokens (" + "; ".join(unfit) + ")"
                return
            t0 = time.perf_counter()
            found = _ruler_evidence(unwrap(model), tokenizer, samples)
            row["seconds"] += time.perf_counter() - t0
            room = ranking_s - (time.perf_counter() - start)
            if ruler is None and row["seconds"] * count > room:
                measured["ruler"] = (f"left out by the budget: on the reference it took {row['seconds'] - base:.0f} s "
                                     f"(average {found['ruler']:.2f}); with it {count} candidates need about "
                                     f"{row['seconds'] * count:.0f} s, the ranking's share has {room:.0f} s left")
                return
            row.update(found)
            plan.update(on=True, samples=(samples, unfit))
            measured["ruler"] = (f"RULER {', '.join(s.task for s in samples)} at {n} tokens, one sample each, "
                                 "RULER's scores / 100" + (f"; left out: {'; '.join(unfit)}" if unfit else ""))
            measured["rank_by"] = "RULER average, then passkey accuracy, then perplexity"
    else:
        from .retrieval import Embedder
        from .synthetic import needle_task, passkey_task

        embedder = Embedder(model, tokenizer, batch_size=1, show_progress=False)
        tasks = [passkey_task(embedder.count_tokens, [n - 2], docs), needle_task(embedder.count_tokens, [n - 2], docs)]
        measured = {"retrieval": f"LongEmbed passkey and needle at {n} tokens, {docs} documents each (top-1 = "
                    "nDCG@1)", "rank_by": "mean top-1 accuracy, then passkey"}
        reference = "truncate"
        add_ruler = None  # RULER measures decoders
        limit = getattr(model, "max_seq_length", None)

        def evidence(applied: Any) -> dict[str, Any]:
            """The queries (and any text within the trained length, under a method that leaves such inputs as they
            were) are encoded once for every candidate: the retrieval eval's scopes."""
            if applied is None:
                embedder.use("reference", trained)
            else:
                exact = get_method(applied.method).unchanged_within
                embedder.use(f"{applied.method} {params_key(applied.params)}", trained if exact else None)
            return _encoder_evidence(embedder, tasks)

        def order(row: dict) -> tuple:
            return (-row["retrieval"], -row["passkey"])

    rows, slowest = [], 0.0
    t0 = time.perf_counter()
    if reference == "truncate" and limit is not None:
        model.max_seq_length = trained
    try:
        rows.append({"method": reference, "params": {}, **evidence(None), "seconds": time.perf_counter() - t0})
    finally:
        if reference == "truncate" and limit is not None:
            model.max_seq_length = limit
    if add_ruler is not None and ruler is not False:
        add_ruler(rows[0])
    log(_line(rows[-1]))
    for method, params in todo:
        spent = time.perf_counter() - start
        if rows[1:] and spent + slowest > ranking_s:
            why = (f"budget ({budget_s:.0f} s) reached" if ranking_s == budget_s else
                   f"the ranking's share of the budget ({ranking_s:.0f} of {budget_s:.0f} s) reached")
            skipped.append({"method": method, "params": params, "why": why})
            continue
        t0 = time.perf_counter()
        with longctx.patched(model, method, tokenizer=tokenizer, **params) as applied:
            row = {"method": method, "params": params, **evidence(applied)}
        row["seconds"] = time.perf_counter() - t0
        slowest = max(slowest, row["seconds"])
        rows.append(row)
        log(_line(row))
    tuning: list[dict[str, Any]] = []
    if tune and info.kind == "decoder":
        rows.extend(_tune(model, tokenizer, tune_ids, n, rows, order, registry, tuning_plan, budget_s, start,
                          slowest, evidence, tuning, skipped, log))
    ranked = sorted(rows[1:], key=order)
    for i, row in enumerate(ranked, 1):
        row["rank"] = i
        row["beats_reference"] = order(row) < order(rows[0])
    rows[0]["rank"] = None
    improves = bool(ranked) and ranked[0]["beats_reference"]
    return Recommendation(n, trained, info.kind, measured, [*ranked, rows[0]], skipped,
                          time.perf_counter() - start, improves, tuning)


def _tune(model: Any, tokenizer: Any, ids: Any, n: int, rows: list[dict], order: Any, registry: Any,
          tuning_plan: tuple[int, int | None], budget_s: float, start: float, slowest: float, evidence: Any, tuning: list[dict], skipped: list[dict],
          log: Any) -> list[dict[str, Any]]:
    """The tuning phase (module docstring): the rows of the tuned candidates that beat their defaults."""
    import longctx

    from .search import search

    tune, tune_trials = tuning_plan
    ranked = sorted(rows[1:], key=order)
    chosen = [m for m in dict.fromkeys(r["method"] for r in ranked) if registry[m].tune is not None][:tune]
    out = []
    for k, method in enumerate(chosen):
        remaining = budget_s - (time.perf_counter() - start)
        share = remaining / (len(chosen) - k) - slowest  # room left to measure the tuned candidate's evidence
        if share <= 0:
            skipped.append({"method": method, "params": {}, "why": f"tuning: budget ({budget_s:.0f} s) reached"})
            continue
        try:
            found = search(model, method, target_length=n, tokenizer=tokenizer, ids=ids, windows=1, budget_s=share,
                           max_trials=tune_trials)
        except ValueError as e:  # the method cannot be tuned at N (STRING past 2L)
            skipped.append({"method": method, "params": {}, "why": "tuning: " + " ".join(str(e).split())})
            continue
        seeds = [r for r in found.rows if r["source"] != "search" and r["ppl"] is not None]
        summary = {"method": method, "candidates": len(found.rows), "seconds": found.seconds, "space": found.space,
                   "default_ppl": min((r["ppl"] for r in seeds), default=None), "best_ppl": found.best["ppl"],
                   "params": found.params, "improved": found.best["source"] == "search"}
        tuning.append(summary)
        log(f"tuned {method}: {len(found.rows)} candidates in {found.seconds:.0f} s, tuning-window ppl "
            f"{summary['default_ppl']:.3g} (defaults) -> {found.best['ppl']:.3g}")
        if not summary["improved"]:
            continue
        t0 = time.perf_counter()
        with longctx.patched(model, method, tokenizer=tokenizer, **found.params) as applied:
            row = {"method": method, "params": found.params, **evidence(applied), "tuned": True}
        row["seconds"] = time.perf_counter() - t0
        out.append(row)
        log(_line(row))
    return out


def _line(row: dict) -> str:
    values = ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float) and k != "seconds")
    params = ", ".join(f"{k}={v}" for k, v in row["params"].items() if k != "target_length")
    tuned = ", tuned" if row.get("tuned") else ""
    return f"{row['method']}{f' ({params}{tuned})' if params else ''}: {values} [{row['seconds']:.0f} s]"


class NoImprovement(RuntimeError):
    """``longctx.patch(model, "auto")`` measured no candidate better than the model as it is; the model is left as it
    was. ``recommendation``: what was measured."""

    def __init__(self, message: str, recommendation: Recommendation) -> None:
        super().__init__(message)
        self.recommendation = recommendation


def auto_patch(model: Any, *, target_length: int | None = None, tokenizer: Any = None, text: str | None = None,
               budget_s: float = 600.0, **options: Any) -> Any:
    """``longctx.patch(model, "auto", target_length=N)``: :func:`recommend`, then the winner applied; its
    ``PatchInfo.evidence`` holds the recommendation (what was measured, every candidate's figures)."""
    import longctx

    if target_length is None:
        raise ValueError("longctx.patch(model, 'auto') needs target_length=N: the context length to choose a method for")
    found = recommend(model, target_length, tokenizer=tokenizer, text=text, budget_s=budget_s, **options)
    if not found.improves:  # never a method measured worse than the model as it is
        reference = next(r for r in found.rows if r["rank"] is None)
        best = found.winner
        raise NoImprovement(
            f"longctx.patch(model, 'auto'): no candidate measured better than the model as it is at {target_length} "
            f"tokens ({_line(reference)}; best candidate {_line(best)}; {len(found.rows) - 1} measured, "
            f"{len(found.not_measured)} left out by the budget); the model is left unpatched. Give a larger "
            "budget_s, or patch a method yourself", found)
    winner = found.winner
    info = longctx.patch(model, winner["method"], tokenizer=tokenizer, **winner["params"])
    info.evidence = found.to_dict()
    info.notes.append(f"chosen by longctx.recommend at {target_length} tokens: {_line(winner)}")
    return info
