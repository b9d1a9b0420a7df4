"""The one registry of methods: name → config dataclass, apply (which returns its own revert), what it supports.

Adding a method is one module under ``patches/`` (a config dataclass, ``apply``, ``NAME``, ``DESCRIPTION``) and one
``register(...)`` line at the bottom of this file; the shared test battery picks it up from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from longctx.patches import absolute, clex, dynamic_ntk, ntk, pi, selfextend, v2pe, yarn
from longctx.patches.base import Applied

__all__ = ["MethodSpec", "registry", "register", "get_method"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method."""

    name: str
    description: str
    config_cls: type
    apply: Callable[[nn.Module, Any], Applied]
    kind: str  # "rope": rotary frequencies; "rope_attention": rotary attention function; "rope_positions": position
    # ids of a rotary model (v2pe); "absolute": position tables
    standard_config: bool  # expressible as a standard transformers/vLLM config

    def parameters(self) -> list[tuple[str, str, Any]]:
        """(name, type, default) of every parameter the method takes."""
        out = []
        for f in dataclasses.fields(self.config_cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append((f.name, str(f.type), default))
        return out

    def make_config(self, **params: Any) -> Any:
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise TypeError(
                f"method '{self.name}' got unknown parameter(s) {unknown}; it accepts: {sorted(names)}"
            )
        return self.config_cls(**params)

    def applies_to(self, info: Any) -> bool:
        """Whether the method fits a model described by ``longctx.inspect`` (its ``position_encoding``; position-id
        methods such as V2PE: vision-language models, ``…ForConditionalGeneration`` with RoPE)."""
        if self.kind == "rope_positions":
            return info.position_encoding == "rope" and info.architecture.endswith("ForConditionalGeneration")
        return info.position_encoding == ("absolute" if self.kind == "absolute" else "rope")


registry: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in registry:
        raise ValueError(f"method '{spec.name}' is already registered")
    registry[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in registry:
        raise ValueError(f"unknown method '{name}'; available methods: {', '.join(sorted(registry))}")
    return registry[key]


_ALIASES = {
    "linear": "pi",
    "dynamic": "dynamic_ntk",
    "ntk_dynamic": "dynamic_ntk",
    "ntk_aware": "ntk",
    "self_extend": "selfextend",
    "grouped_attention": "selfextend",
    "chunk": "pcw",
    "chunking": "pcw",
}


def _spec(module: Any, config_cls: type, kind: str = "rope", standard: bool = True) -> MethodSpec:
    return MethodSpec(module.NAME, module.DESCRIPTION, config_cls, module.apply, kind, standard)


register(_spec(pi, pi.PIConfig))
register(_spec(ntk, ntk.NTKConfig))
register(_spec(dynamic_ntk, dynamic_ntk.DynamicNTKConfig))
register(_spec(yarn, yarn.YaRNConfig))
register(_spec(selfextend, selfextend.SelfExtendConfig, kind="rope_attention", standard=False))
register(_spec(clex, clex.CLEXConfig, standard=False))
register(_spec(v2pe, v2pe.V2PEConfig, kind="rope_positions", standard=False))

register(MethodSpec(
    "grouped", "absolute positions grouped: p -> p // ceil(n / L) for an n-token input (LongEmbed); exact for n <= L",
    absolute.GroupedConfig, absolute.apply_grouped, kind="absolute", standard_config=False,
))
register(MethodSpec(
    "recurrent", "absolute positions recurring: p -> p mod L (LongEmbed); exact for n <= L",
    absolute.RecurrentConfig, absolute.apply_recurrent, kind="absolute", standard_config=False,
))
register(MethodSpec(
    "pcw", "chunk-and-average (LongEmbed's parallel context windows): chunks of L - 2 tokens + specials, the last "
    "overlapping, chunk embeddings averaged; exact for n <= L",
    absolute.PCWConfig, absolute.apply_pcw, kind="absolute", standard_config=False,
))
register(MethodSpec(
    "pi_absolute", "position interpolation of a learned absolute table (LongEmbed's PI; 'pi' on an absolute-position "
    "model); learned rows kept as anchors, exact for n <= L",
    absolute.AbsolutePIConfig, absolute.apply_pi, kind="absolute", standard_config=False,
))
