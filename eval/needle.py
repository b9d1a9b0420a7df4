"""Needle in a haystack by generation (decoders), RULER's single-needle format on real prose.

The prompt: real text (the bundled public-domain novel, or any text given) cut to the requested length in the
model's tokens, with "One of the special magic numbers for <name> is: <number>." inserted at a depth, then
"What is the special magic number for <name> mentioned in the provided text? The special magic number for <name>
mentioned in the provided text is". The first run of digits generated greedily is the answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from .passkey import PasskeyTrial, generate_trial, run_grid
from .synthetic import _FIRST, _LAST, default_haystack

__all__ = ["needle_prompt", "needle_grid"]

NEEDLE = "One of the special magic numbers for {name} is: {key}."
QUESTION = (
    "What is the special magic number for {name} mentioned in the provided text? "
    "The special magic number for {name} mentioned in the provided text is"
)


def needle_prompt(tokenizer: Any, length: int, depth: float, name: str, key: str, haystack: str,
                  offset: int = 0) -> str:
    """About ``length`` tokens: haystack words from ``offset``, the needle at ``depth`` (0 start, 1 end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    words = haystack.split()

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True, verbose=False).input_ids)

    needle, question = NEEDLE.format(name=name, key=key), QUESTION.format(name=name)
    budget = length - count(needle + "\n" + question)
    per_word = count(" ".join(words[:2000])) / max(1, len(words[:2000]))
    n_words = max(1, int(budget / per_word))
    if n_words > len(words):
        raise ValueError(f"the haystack has {len(words)} words, too few for a {length}-token prompt")
    start = offset % max(1, len(words) - n_words + 1)
    body = words[start : start + n_words]
    over = count(" ".join(body)) - budget
    while len(body) > 1 and over > 0:  # the per-word estimate ran over: trim by the excess
        body = body[: len(body) - max(1, int(over / per_word))]
        over = count(" ".join(body)) - budget
    at = round(depth * len(body))
    return " ".join(body[:at] + [needle] + body[at:]) + "\n" + question


def needle_maker(model: Any, tokenizer: Any, haystack: str | None = None,
                 digits: int = 7) -> Callable[[int, float, random.Random], PasskeyTrial]:
    """One needle trial per call: ``make(length, depth, rng)``, name, number and haystack offset drawn from ``rng``."""
    haystack = haystack if haystack is not None else default_haystack()

    def make(n: int, d: float, rng: random.Random) -> PasskeyTrial:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        key = str(rng.randrange(10 ** (digits - 1), 10**digits))
        prompt = needle_prompt(tokenizer, n, d, name, key, haystack, offset=rng.randrange(1 << 30))
        return generate_trial(model, tokenizer, prompt, n, d, key)

    return make


def needle_grid(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    trials: int = 1,
    seed: int = 0,
    digits: int = 7,
    haystack: str | None = None,
    progress: bool = True,
    **grid: Any,
) -> list[PasskeyTrial]:
    """``trials`` needles per (length, depth); each with its own name, number and haystack offset drawn from
    ``cell_seed``; ``grid`` passes ``done`` / ``on_result`` to ``run_grid``."""
    return run_grid(needle_maker(model, tokenizer, haystack, digits), lengths, depths, trials=trials, seed=seed,
                    desc="needle", progress=progress, **grid)
