"""mteb 2.x adapter (``pip install longctx[mteb]``): run mteb's tasks (``LEMBPasskeyRetrieval``,
``LEMBNeedleRetrieval``, ``LEMBNarrativeQARetrieval`` … when their data is at hand) on an extended model.

    import mteb, longctx
    from longctx.eval.mteb_adapter import mteb_encoder
    encoder = mteb_encoder(st, "grouped", target_length=32768)
    mteb.evaluate(encoder, mteb.get_tasks(tasks=["LEMBPasskeyRetrieval"]))

The encoder is mteb's own sentence-transformers wrapper around the (patched) model, with model metadata whose
``experiment_kwargs`` name the longctx method and its resolved parameters: mteb keys results and its result cache
by name, revision *and* experiment, so an extended model's scores never overwrite or mix with its base model's,
while the name stays the base model's (leaderboard comparisons line up). ``max_tokens`` is the patched length.
"""

from __future__ import annotations

from typing import Any

import longctx

__all__ = ["mteb_encoder", "experiment_kwargs"]


def experiment_kwargs(model: Any) -> dict[str, Any] | None:
    """What distinguishes a patched model in mteb's records: ``longctx_method`` plus the resolved parameters."""
    info = longctx.patch_info(model)
    if info is None:
        return None
    return {"longctx_method": info.method, **{k: v for k, v in sorted(info.params.items())}}


def mteb_encoder(model: Any, method: str | None = None, *, name: str | None = None, **params: Any) -> Any:
    """A sentence-transformers ``model`` as an mteb 2.x encoder; with ``method`` it is patched first
    (``longctx.patch(model, method, **params)``), otherwise its current patch (if any) is described.

    ``name`` overrides the model name mteb records (default: the one mteb derives from the model)."""
    try:
        import mteb
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("the mteb adapter needs mteb 2.x: pip install 'longctx[mteb]'") from err
    if not (hasattr(model, "encode") and hasattr(model, "tokenizer")):
        raise TypeError(f"mteb_encoder takes a sentence-transformers model, got {type(model).__name__}")
    if method is not None:
        longctx.patch(model, method, **params)
    elif params:
        raise TypeError("method parameters given without a method")
    encoder = mteb.SentenceTransformerEncoderWrapper(model)
    meta = encoder.mteb_model_meta
    update: dict[str, Any] = {}
    if name is not None:
        update["name"] = name
    extra = experiment_kwargs(model)
    if extra is not None:
        update["experiment_kwargs"] = {**(meta.experiment_kwargs or {}), **extra}
        update["max_tokens"] = longctx.patch_info(model).target_length
    if update:
        encoder.mteb_model_meta = meta.model_copy(update=update)
    return encoder
