"""Evaluations an export runs on its reloaded checkpoint (``longctx export --verify`` / ``--eval``), handed to
:func:`longctx.export` as checks — export itself never imports eval.

* ``passkey_check(lengths="target", depths=(0.5,), docs=4)``: one passkey check at the target length (``--verify``);
* ``passkey_check(lengths="both", depths=(0.1, 0.5, 0.9), docs=8)``: passkey at the trained and the target length
  (``--eval``).

Decoders: passkey by generation (one trial per depth); embedding models: LongEmbed passkey retrieval over ``docs``
documents per length. An export without a tokenizer gets no rows (the card says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["passkey_check", "export_checks", "passkey_rows", "passkey_table"]


def passkey_rows(model: Any, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float], docs: int,
                 progress: bool) -> list[dict]:
    """Passkey on ``model`` at each length: by generation on a decoder (one trial per depth), LongEmbed passkey
    retrieval over ``docs`` documents on an embedding model. No tokenizer: no rows."""
    import longctx
    from longctx.models import unwrap

    if tokenizer is None:
        return []
    if longctx.inspect(model).kind == "decoder":
        from .passkey import passkey_grid

        trials = passkey_grid(unwrap(model), tokenizer, [n - 16 for n in lengths], list(depths), progress=progress)
        return [{"kind": "generation", **t.to_dict()} for t in trials]
    from .retrieval import Embedder, evaluate
    from .synthetic import passkey_task

    embedder = Embedder(model, tokenizer, batch_size=1, show_progress=progress)
    task = passkey_task(embedder.count_tokens, [n - 2 for n in lengths], n_docs=docs)
    rows = []
    for n in lengths:
        metrics, _ = evaluate(embedder, task.split(n - 2), ks=(1,))
        rows.append({"kind": "retrieval", "length": n - 2, "documents": docs, **metrics})
    return rows


def passkey_table(rows: list[dict]) -> list[str]:
    """Markdown lines for the model card."""
    if not rows:
        return ["No tokenizer in the export: no passkey run."]
    if rows[0]["kind"] == "retrieval":
        out = ["| prompt tokens | documents | nDCG@1 |", "|---|---|---|"]
        return out + [f"| {r['length']} | {r['documents']} | {r['ndcg@1']:.3f} |" for r in rows]
    out = ["| prompt tokens | depths | correct |", "|---|---|---|"]
    for n in dict.fromkeys(r["length"] for r in rows):
        cell = [r for r in rows if r["length"] == n]
        out.append(f"| {max(r['tokens'] for r in cell)} | {', '.join(str(r['depth']) for r in cell)} | "
                   f"{sum(r['correct'] for r in cell)} / {len(cell)} |")
    return out


def passkey_check(name: str = "passkey", title: str = "Passkey", lengths: str = "target",
                  depths: Sequence[float] = (0.5,), docs: int = 4) -> Any:
    """A :class:`longctx.export.Check` running passkey at the target length (``lengths="target"``) or at the trained
    and the target length (``"both"``)."""
    import longctx.export as export_module

    def run(model: Any, tokenizer: Any, result: Any, progress: bool) -> tuple[list[dict], list[str]]:
        chosen = [result.target_length] if lengths == "target" else [result.trained_length, result.target_length]
        rows = passkey_rows(model, tokenizer, chosen, depths, docs, progress)
        return rows, passkey_table(rows)

    return export_module.Check(name, title, run)


def export_checks(verify: bool = False, eval: bool = False) -> list[Any]:
    """The checks ``longctx export --verify`` / ``--eval`` run."""
    checks = []
    if verify:
        checks.append(passkey_check("verify_passkey", "Passkey at the target length (`--verify`)", "target", (0.5,), 4))
    if eval:
        checks.append(passkey_check("eval", "Passkey (`--eval`)", "both", (0.1, 0.5, 0.9), 8))
    return checks
