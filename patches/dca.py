"""Dual Chunk Attention (An et al., ICML 2024, *Training-Free Long-Context Scaling of Large Language Models*;
official code ``HKUNLP/ChunkLlama``, ``chunkllama_attn_replace.py``) as an attention runtime — no forward replaced,
no class swapped, callable on a built model.

The sequence is cut into chunks of c = s − w positions (s the chunk size, w the local window); keys sit at
``j mod c``; a query sits at ``i mod c`` for keys of its own chunk, at ``min(i mod c + c, s)`` for the previous
chunk and at ``min(2c − 1, s)`` for older chunks (``longctx.core.pairmaps.DCAMap``), so no relative distance
exceeds s. ``mscale`` multiplies cos and sin by the official ``0.05·ln(n/L) + 1`` once n > L, i.e. queries and keys
— logits by its square; keys keep the mscale of the step that wrote them, as the official cache does.

Semantics as coded, exactly (tested against the official code's outputs, ``../shared/fixtures/dca_official``), with
two differences by design: the official merge casts its softmax weights to bf16 (the logits move by up to 0.03 on the
fixture; longctx merges in fp32 and matches the ``*_nocast`` reference), and the official rotary keeps its mscale
state across sequences (a second prompt inherits the first one's largest length); longctx starts every sequence
afresh, as a fresh model does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from longctx.core.pairmaps import DCAMap, dca_geometry, dca_mscale

from .base import Applied, Undo, param
from .pairmap import PairMapConfig, PairMapRuntime, decoder, install_pairmap
from .registry import Method, register
from .space import SearchSpace, Tunable, rope_trained_length

NAME = "dca"
DESCRIPTION = ("Dual Chunk Attention: positions within chunks of s - w, queries remapped for the previous and older "
               "chunks so no distance exceeds s; an attention function, exact, O(n) memory (ChunkLlama; SGLang serves it).")


@dataclass(frozen=True)
class DCAConfig(PairMapConfig):
    """Dual Chunk Attention. ``chunk_size`` s (default ¾ of the trained length L), ``local_window`` w (default
    L/8); ``mscale``: the official ``0.05·ln(n/L) + 1`` on cos and sin once n > L; ``target_length``: the length you
    want (recorded, raises ``max_position_embeddings``: DCA has no hard reach)."""

    method: ClassVar[str] = NAME
    chunk_size: int | None = param(kind=int, ge=2, doc="s: the chunk size (default 3/4 of the trained length)")
    local_window: int | None = param(kind=int, ge=1, doc="w: the local window (default 1/8 of the trained length)")
    mscale: bool = param(True, kind=bool, optional=False, doc="0.05 ln(n/L) + 1 on cos and sin once n > L")


class DCARuntime(PairMapRuntime):
    """Dual Chunk Attention on the extended layers."""

    def __init__(self, pmap: DCAMap, mscale: bool, trained_length: int, rotary: nn.Module, layer_types: list) -> None:
        self.pmap, self.mscale, self.trained_length = pmap, mscale, trained_length
        super().__init__(rotary, layer_types)

    def tag(self) -> tuple:
        return (self.pmap, self.mscale, self.trained_length)

    def query_scale(self, q_pos: torch.Tensor, n: torch.Tensor) -> torch.Tensor | None:
        if not self.mscale:
            return None
        return self.mscale_of(n).to(q_pos.device)[:, None].expand(q_pos.shape)

    def key_scale(self, n: torch.Tensor) -> torch.Tensor | None:
        return self.mscale_of(n) if self.mscale else None

    def mscale_of(self, n: torch.Tensor) -> torch.Tensor:
        """The mscale for ``n`` real keys per row, computed where ``n`` is (no device sync per layer; MPS has no
        float64, so there on the CPU)."""
        where = n.cpu() if n.device.type == "mps" else n
        return dca_mscale(where, self.trained_length).to(n.device)


def apply(model: nn.Module, cfg: DCAConfig, undo: Undo) -> Applied:
    found = decoder(model, cfg)
    L = found.trained_length
    s, w, c = dca_geometry(L, cfg.chunk_size, cfg.local_window)
    runtime = DCARuntime(DCAMap(s, w), cfg.mscale, L, found.rotary, found.layer_types)
    note = (f"chunks of {c} positions (chunk size {s}, local window {w}); relative positions at most {s} of {L}"
            + ("; mscale 0.05 ln(n/L) + 1 once n > L" if cfg.mscale else ""))
    return install_pairmap(model, runtime, undo, cfg, found,
                           {"chunk_size": s, "local_window": w, "mscale": cfg.mscale}, note)


def engine_config(params: dict[str, Any]) -> dict[str, Any]:
    """The ``dual_chunk_attention_config`` SGLang's dual-chunk backend reads (and vLLM ≤ 0.10's did; see
    :func:`engines` and docs/methods/dca.md for how its semantics compare), and ``max_position_embeddings`` = the
    target so the engine serves that length."""
    keys: dict[str, Any] = {"dual_chunk_attention_config": {
        "chunk_size": params["chunk_size"], "local_size": params["local_window"],
        "original_max_position_embeddings": params["trained_length"] if params.get("mscale") else 0}}
    if params.get("target_length"):
        keys["max_position_embeddings"] = params["target_length"]
    return keys


def engines(params: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """Who serves ``dual_chunk_attention_config``, from the engines' sources: SGLang's ``dual_chunk_flash_attn``
    backend (python/sglang/srt/layers/attention/dual_chunk_flashattention_backend.py, rotary_embedding/factory.py:
    ``chunk_size``, ``local_size``, ``original_max_position_embeddings``); vLLM parses the key but lost the backend
    with its V0 engine in 0.11.0 (PR #25351)."""
    target = params.get("target_length") or "N"
    return {
        "sglang": (True, "runs it where the model's SGLang attention passes dual_chunk_attention_config to get_rope "
                         "(the Qwen2 / Qwen3 families it was written for, e.g. Qwen2.5-1M; check other families' model "
                         f"file): `python -m sglang.launch_server --model-path OUT --attention-backend "
                         f"dual_chunk_flash_attn --context-length {target}`; its length scaling multiplies the keys by "
                         "0.1·ln(n/L) + 1 (longctx and ChunkLlama: cos / sin by 0.05·ln(n/L) + 1, the same to first "
                         "order), so logits past L differ slightly"),
        "vllm": (False, "does not run it: vLLM ≥ 0.11 parses dual_chunk_attention_config but has no backend for it "
                        "(the dual-chunk backend went with the V0 engine, PR #25351) and serves the base model's "
                        "attention; vLLM 0.8 … 0.10 ran it on Qwen2-family models with "
                        "VLLM_ATTENTION_BACKEND=DUAL_CHUNK_FLASH_ATTN (V0)"),
    }


def tune(model: nn.Module, target_length: int) -> SearchSpace:
    """The chunk size s in [L/4, L], the local window w in [L/64, L/4] (w < s checked by the patch), mscale."""
    L = rope_trained_length(model, NAME)
    return SearchSpace(
        {"chunk_size": Tunable(max(2, L // 4), L, int), "local_window": Tunable(max(1, L // 64), max(1, L // 4), int,
                                                                                log=True),
         "mscale": Tunable(choices=(True, False))},
        {"default": {}}, {"target_length": int(target_length)},
        note=f"chunk size in [{max(2, L // 4)}, {L}], local window in [{max(1, L // 64)}, {max(1, L // 4)}], mscale")


METHOD = register(Method(
    NAME, "rope_attention", DESCRIPTION, DCAConfig, apply, export_form="longctx", aliases=("dual_chunk",
                                                                                            "chunkllama"),
    bounded=False, tune=tune,
    decoders_only=True, config_keys=engine_config, engines=engines,
    examples=lambda L: [{"target_length": 4 * L}, {"chunk_size": L // 2, "local_window": L // 8, "mscale": False}],
))
