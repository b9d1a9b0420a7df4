"""The one registry of methods (floor 3): each method module declares a :class:`Method` and registers it.

A method declares everything about itself — name, kind, description, its config dataclass (which validates itself),
``apply`` (its edits go onto the :class:`~longctx.patches.base.Undo` it is given), its export form, aliases, and,
where its authors released checkpoints, how they are recognised and loaded. ``longctx.api``, export, the CLI and
eval read these declarations; none of them names a method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import Applied, MethodConfig, Undo

__all__ = ["Method", "registry", "register", "get_method", "FORMS", "KINDS"]

KINDS = ("rope", "rope_attention", "rope_positions", "absolute")
FORMS = ("config", "longctx", "weights")


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: what ``longctx.patch(model, name)`` takes.
        kind: ``"rope"`` (rotary frequencies), ``"rope_attention"`` (an attention function over rotary q/k),
            ``"rope_positions"`` (position ids of a rotary vision-language model), ``"absolute"`` (a learned position
            table of an encoder).
        description: one line for ``longctx methods`` and the README.
        config: its :class:`~longctx.patches.base.MethodConfig` subclass.
        apply: ``apply(model, config, undo) -> Applied``; every edit goes onto ``undo`` (raising leaves it to the
            caller to undo).
        export_form: ``"config"`` (a standard config expresses it: plain transformers and vLLM load it), ``"longctx"``
            (the base model plus a ``longctx`` block that ``longctx.load`` re-applies) or ``"weights"`` (the weights
            change); or a function of the resolved parameters giving one of these.
        aliases: other names it answers to.
        on_absolute: the method this name means on an absolute-position model (``pi`` → ``pi_absolute``).
        recognise: ``recognise(config_json) -> bool`` for a checkpoint as its authors released it (CLEX).
        load_checkpoint: ``load_checkpoint(folder, dtype=, device=, **options) -> (model, params)``: such a checkpoint
            on transformers' own class, and the parameters to patch it with.
        legacy_rope_types: rope types earlier longctx versions wrote into saved configs, mapped to
            ``f(rope_parameters) -> (base rope parameters, patch parameters)``, so those saves still load.
        decoders_only: the method is defined for causal attention only (``applies_to`` says no for encoders).
        config_keys: ``config_keys(record params) -> {key: value}``: config.json keys the method writes beside its
            ``longctx`` block (while patched and in exports), e.g. the ``dual_chunk_attention_config`` SGLang serves.
        compare_by_default: run in the evaluations' default comparison (beside the model as it is) on the models it
            applies to.
        examples: ``examples(trained_length) -> [params, …]``: typical patches of a model trained at that length,
            each variant of the method once (the docs show them; the contract battery runs every one).
        unchanged_within: inputs no longer than the trained length (special tokens included) give exactly the
            unpatched model's outputs, bit for bit (the evaluations reuse such embeddings across methods; the
            contract battery checks the claim on every method that makes it).
        bounded: the extension holds up to the target length it was set up for (frequencies or a table sized for it);
            an input past it gets a warning. False for methods without a reach (DCA, ReRoPE, grouped positions …).
        cache_exact: cached decoding of a one-layer model equals recomputing the whole sequence, with every kind of
            cache (dynamic, static, sliding-window); a function of the patch's parameters where it depends on them
            (dynamic NTK's standard mode keeps the keys it cached at the frequencies of their time: False). The
            contract battery's integration axis checks it.
        tune: ``tune(model, target_length) -> SearchSpace`` (``longctx.patches.space``): the parameters
            ``longctx.search`` and ``longctx recommend`` may tune at that length, the seeds they start from; ``None``:
            the method is ranked with its declared variants, not tuned.
        engines: ``engines(record params) -> {engine: (runs it, line)}`` for a method no standard config expresses:
            which serving engines (``"vllm"``, ``"sglang"``, ``"llama.cpp"``) run it and how (the exact serve line),
            or why not, from each engine's source. Undeclared engines do not run it (:meth:`engine_lines`). Methods
            of the config form are read by rope type instead (``longctx.patches.portable.READERS``).
        carry_files: parameters naming files that an export must carry along, each mapped to
            ``write(value, directory) -> "./name"`` (it writes the file into the export and returns how the saved
            record refers to it; ``longctx.load`` resolves ``./`` against the export's directory).
    """

    name: str
    kind: str
    description: str
    config: type[MethodConfig]
    apply: Callable[[nn.Module, Any, Undo], Applied]
    export_form: str | Callable[[dict[str, Any]], str]
    aliases: tuple[str, ...] = ()
    on_absolute: str | None = None
    recognise: Callable[[dict], bool] | None = None
    load_checkpoint: Callable[..., tuple[Any, dict[str, Any]]] | None = None
    legacy_rope_types: dict[str, Callable[[dict], tuple[dict, dict]]] = dataclasses.field(default_factory=dict)
    decoders_only: bool = False
    config_keys: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    compare_by_default: bool = False
    examples: Callable[[int], list[dict[str, Any]]] = dataclasses.field(default=None)  # type: ignore[assignment]
    carry_files: dict[str, Callable[[Any, Any], str]] = dataclasses.field(default_factory=dict)
    unchanged_within: bool = False
    cache_exact: bool | Callable[[dict[str, Any]], bool] = True
    bounded: bool = True
    tune: Callable[[nn.Module, int], Any] | None = None
    engines: Callable[[dict[str, Any]], dict[str, tuple[bool, str]]] | None = None

    def __post_init__(self) -> None:
        if self.examples is None:
            object.__setattr__(self, "examples", _four_times)
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.export_form, str) and self.export_form not in FORMS:
            raise ValueError(f"method {self.name}: export_form must be one of {FORMS}, got {self.export_form!r}")
        if self.config.method != self.name:
            raise ValueError(f"method {self.name}: its config class {self.config.__name__} says method "
                             f"{self.config.method!r}")

    @property
    def standard_config(self) -> bool:
        """Whether a standard config can express the method (for its default parameters)."""
        return self.form({}) == "config"

    def form(self, params: dict[str, Any]) -> str:
        """The export form for these resolved parameters."""
        return self.export_form(params) if callable(self.export_form) else self.export_form

    def engine_lines(self, params: dict[str, Any]) -> dict[str, tuple[bool, str]]:
        """Per serving engine: ``(runs it as meant, the line the card prints)`` for a method of the longctx form
        (declared by ``engines``; an engine it does not declare loads the base model unextended)."""
        declared = self.engines(params) if self.engines else {}
        lines = {engine: (False, f"does not run {self.name}: it loads the base model, unextended (the longctx block "
                                 "is longctx's own)") for engine in ("vllm", "sglang", "llama.cpp")}
        return {**lines, **declared}

    def parameters(self) -> list[tuple[str, str, Any]]:
        """(name, type, default) of every parameter the method takes."""
        out = []
        for f in dataclasses.fields(self.config):
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append((f.name, str(f.type), default))
        return out

    def parameter_help(self) -> dict[str, str]:
        """One line per parameter: what it does and what it accepts."""
        out = {}
        for f in dataclasses.fields(self.config):
            check = f.metadata.get("check")
            doc = f.metadata.get("doc", "")
            out[f.name] = f"{doc} ({check.allowed()})" if check is not None else doc
        return out

    def make_config(self, **params: Any) -> MethodConfig:
        """The validated config (``TypeError`` for an unknown parameter, ``ValueError`` for a bad value)."""
        names = [f.name for f in dataclasses.fields(self.config)]
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise TypeError(f"method '{self.name}' got unknown parameter(s) {unknown}; it accepts: {sorted(names)}")
        return self.config(**params)

    def exact_cache(self, params: dict[str, Any]) -> bool:
        """Whether :attr:`cache_exact` holds for these parameters."""
        return self.cache_exact(params) if callable(self.cache_exact) else bool(self.cache_exact)

    def applies_to(self, info: Any) -> bool:
        """Whether the method fits a model described by ``longctx.inspect`` (its ``position_encoding``; position-id
        methods such as V2PE: vision-language models, ``…ForConditionalGeneration`` with RoPE)."""
        if self.kind == "rope_positions":
            return info.position_encoding == "rope" and info.architecture.endswith("ForConditionalGeneration")
        if self.decoders_only and info.kind != "decoder":
            return False
        return info.position_encoding == ("absolute" if self.kind == "absolute" else "rope")


def _four_times(trained_length: int) -> list[dict[str, Any]]:
    return [{"target_length": 4 * trained_length}]


registry: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (each method module calls this once, at import)."""
    for name in (method.name, *method.aliases):
        if name in registry or name in _ALIASES:
            raise ValueError(f"method name '{name}' is already registered")
    registry[method.name] = method
    for alias in method.aliases:
        _ALIASES[alias] = method.name
    return method


def get_method(name: str) -> Method:
    """The method registered under ``name`` (or one of its aliases; case and ``-`` / ``_`` do not matter)."""
    if not isinstance(name, str):
        raise ValueError(f"a method name is a string, got {name!r}; available methods: {', '.join(sorted(registry))}")
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in registry:
        raise ValueError(f"unknown method '{name}'; available methods: {', '.join(sorted(registry))}")
    return registry[key]
