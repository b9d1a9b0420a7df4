"""Passkey retrieval by generation, in the Landmark / LongLM format.

The prompt: an instruction, repeated filler ("The grass is green. The sky is blue. …"), the line
"The pass key is N. Remember it. N is the pass key." at a given depth, more filler, then
"What is the pass key? The pass key is". The model generates a few tokens greedily; the first run of digits is the
answer. Lengths are in tokens of the model's own tokenizer (the prompt is built to within one filler line of it).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .progress import progress as show

__all__ = ["PasskeyTrial", "passkey_prompt", "passkey_trial", "passkey_grid", "parse_answer", "generate_trial"]

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
def generate_trial(model: Any, tokenizer: Any, prompt: str, length: int, depth: float, key: str) -> PasskeyTrial:
    """Greedy generation after ``prompt``; the first run of digits is the answer, correct when it equals ``key``."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(key) + 4, do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    answer = parse_answer(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return PasskeyTrial(length, ids.shape[1], depth, key, answer, answer == key)


def passkey_trial(model: Any, tokenizer: Any, length: int, depth: float, key: str) -> PasskeyTrial:
    return generate_trial(model, tokenizer, passkey_prompt(tokenizer, length, depth, key), length, depth, key)


def passkey_grid(
    model: Any,
    tokenizer: Any,
    lengths: list[int],
    depths: list[float],
    *,
    digits: int = 5,
    seed: int = 0,
    trials: int = 1,
    progress: bool = True,
) -> list[PasskeyTrial]:
    """``trials`` trials per (length, depth), each with its own seeded random key."""
    rng = random.Random(seed)
    cells = [(n, d) for n in lengths for d in depths for _ in range(trials)]
    results = []
    for n, d in show(cells, desc="passkey", enabled=progress):
        key = str(rng.randrange(10 ** (digits - 1), 10**digits))
        results.append(passkey_trial(model, tokenizer, n, d, key))
    return results
