"""Passkey retrieval by generation, in the Landmark / LongLM format.

The prompt: an instruction, repeated filler ("The grass is green. The sky is blue. …"), the line
"The pass key is N. Remember it. N is the pass key." at a given depth, more filler, then
"What is the pass key? The pass key is". The model generates a few tokens greedily; the first run of digits is the
answer. Lengths are in tokens of the model's own tokenizer (the prompt is built to within one filler line of it).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .progress import progress as show

__all__ = ["PasskeyTrial", "passkey_prompt", "passkey_trial", "passkey_grid", "parse_answer", "generate_trial",
           "greedy", "cell_seed", "run_grid"]

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyTrial:
    length: int  # requested tokens
    tokens: int  # actual prompt tokens
    depth: float
    key: str
    answer: str
    correct: bool
    trial: int = 0  # index of the trial within its (length, depth) cell
    seed: int = 0  # the cell seed its key (and name, offset) came from: see ``cell_seed``

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: str) -> str:
    """A prompt of about ``length`` tokens with the key line at ``depth`` (0 = start, 1 = end) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True).input_ids)

    fixed = count("\n".join([INSTRUCTION, KEY_LINE.format(key=key), QUESTION]))
    per_line = max(1, count("\n".join([FILLER] * 50)) / 50)
    n_lines = max(1, int((length - fixed) / per_line))
    at = round(depth * n_lines)
    lines = [INSTRUCTION] + [FILLER] * at + [KEY_LINE.format(key=key)] + [FILLER] * (n_lines - at) + [QUESTION]
    return "\n".join(lines)


def parse_answer(text: str) -> str:
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[tuple[str, int]]:
    """Greedy continuations of ``prompts`` (left-padded into one batch when there are several), each with its
    prompt's number of tokens: the decoders' generation for passkey, needle and RULER."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenizer(p).input_ids for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
    return [(tokenizer.decode(row[width:], skip_special_tokens=True), len(r)) for row, r in zip(out, rows)]


def generate_trial(model: Any, tokenizer: Any, prompt: str, length: int, depth: float, key: str) -> PasskeyTrial:
    """Greedy generation after ``prompt``; the first run of digits is the answer, correct when it equals ``key``."""
    ((text, tokens),) = greedy(model, tokenizer, [prompt], len(key) + 4)
    answer = parse_answer(text)
    return PasskeyTrial(length, tokens, depth, key, answer, answer == key)


def passkey_trial(model: Any, tokenizer: Any, length: int, depth: float, key: str) -> PasskeyTrial:
    return generate_trial(model, tokenizer, passkey_prompt(tokenizer, length, depth, key), length, depth, key)


def cell_seed(seed: int, length: int, depth_index: int, trial: int) -> int:
    """The seed of one trial: ``seed + 1000·length + 100·trial + depth_index``.

    Each trial draws from its own generator, so a trial's key does not depend on which other cells run: a grid can
    be split over several runs, resumed, or extended by more trials (or by ``seed + 100·k`` rounds) without
    repeating or shifting keys.
    """
    return seed + 1000 * length + 100 * trial + depth_index


def iter_grid(
    make_trial: Callable[[int, float, random.Random], PasskeyTrial],
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    trials: int = 1,
    seed: int = 0,
    done: Container[tuple[int, float, int]] = (),
    desc: str = "trials",
    progress: bool = True,
) -> Iterator[PasskeyTrial]:
    """Yield ``make_trial(length, depth, rng)`` for every (length, depth, trial) cell whose ``(length, depth, seed)``
    is not in ``done``, as each finishes; ``rng`` is seeded by ``cell_seed``."""
    cells = [(n, d, t, cell_seed(seed, n, i, t)) for n in lengths for i, d in enumerate(depths) for t in range(trials)]
    for n, d, t, s in show([c for c in cells if (c[0], c[1], c[3]) not in done], desc=desc, enabled=progress):
        trial = make_trial(n, d, random.Random(s))
        trial.trial, trial.seed = t, s
        yield trial


def run_grid(
    make_trial: Callable[[int, float, random.Random], PasskeyTrial],
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    on_result: Callable[[PasskeyTrial], None] | None = None,
    **grid: Any,
) -> list[PasskeyTrial]:
    """Every trial of :func:`iter_grid` in a list; ``on_result`` sees each as it finishes."""
    results = []
    for trial in iter_grid(make_trial, lengths, depths, **grid):
        if on_result is not None:
            on_result(trial)
        results.append(trial)
    return results


def passkey_maker(model: Any, tokenizer: Any, digits: int = 5) -> Callable[[int, float, random.Random], PasskeyTrial]:
    """One passkey trial per call: ``make(length, depth, rng)``, the key drawn from ``rng``."""

    def make(n: int, d: float, rng: random.Random) -> PasskeyTrial:
        return passkey_trial(model, tokenizer, n, d, str(rng.randrange(10 ** (digits - 1), 10**digits)))

    return make


def passkey_grid(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    digits: int = 5,
    seed: int = 0,
    trials: int = 1,
    progress: bool = True,
    **grid: Any,
) -> list[PasskeyTrial]:
    """``trials`` trials per (length, depth), each with its own key drawn from ``cell_seed``; ``grid`` passes
    ``done`` / ``on_result`` to ``run_grid``."""
    return run_grid(passkey_maker(model, tokenizer, digits), lengths, depths, trials=trials, seed=seed,
                    desc="passkey", progress=progress, **grid)
