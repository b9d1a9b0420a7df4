"""Passkey prompts (Landmark / LongLM format), answer parsing and the trial plumbing."""

from __future__ import annotations

import pytest

from longctx.eval.passkey import FILLER, QUESTION, passkey_prompt, passkey_trial, parse_answer


@pytest.fixture(scope="module")
def tokenizer(stories_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_path)


@pytest.mark.parametrize("length", [300, 1000, 4000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_length_and_depth(tokenizer, length, depth):
    prompt = passkey_prompt(tokenizer, length, depth, "12345")
    n = len(tokenizer(prompt).input_ids)
    per_line = len(tokenizer(FILLER).input_ids)
    assert length - 2 * per_line <= n <= length
    lines = prompt.split("\n")
    at = next(i for i, line in enumerate(lines) if "12345" in line)
    assert lines[at] == "The pass key is 12345. Remember it. 12345 is the pass key."
    fillers = len(lines) - 3
    assert abs((at - 1) / fillers - depth) <= 1 / fillers + 1e-9
    assert lines[-1] == QUESTION and lines[0].startswith("There is an important info hidden")


def test_parse_answer():
    assert parse_answer(" 72498. Remember") == "72498"
    assert parse_answer(" is 1127250844") == "1127250844"
    assert parse_answer(" unknown") == ""


def test_bad_depth(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, 500, 1.5, "1")


def test_trial_plumbing(tokenizer, stories_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    trial = passkey_trial(model, tokenizer, 400, 0.5, "31415")
    assert trial.key == "31415" and trial.tokens <= 400 and trial.correct == (trial.answer == "31415")


def test_cell_seeds_do_not_depend_on_the_rest_of_the_grid():
    import random

    from longctx.eval.passkey import PasskeyTrial, cell_seed, run_grid

    def make(n, d, rng):
        key = str(rng.randrange(10**4, 10**5))
        return PasskeyTrial(n, n, d, key, key, True)

    full = run_grid(make, [100, 200], [0.0, 0.5, 1.0], trials=2, seed=7, progress=False)
    part = run_grid(make, [200], [0.0, 0.5, 1.0], trials=2, seed=7, progress=False)
    assert [(t.length, t.depth, t.trial, t.key) for t in full[6:]] == [(t.length, t.depth, t.trial, t.key) for t in part]
    # the documented formula, and the key drawn from it first
    t = full[3]  # length 100, depth index 1, trial 1
    assert t.seed == cell_seed(7, 100, 1, 1) == 7 + 100_000 + 100 + 1
    assert t.key == str(random.Random(t.seed).randrange(10**4, 10**5))
    assert len({t.key for t in full}) == len(full)

    seen = []
    done = {(t.length, t.depth, t.seed) for t in full[:4]}
    rest = run_grid(make, [100, 200], [0.0, 0.5, 1.0], trials=2, seed=7, done=done, on_result=seen.append,
                    progress=False)
    assert rest == seen and [t.key for t in rest] == [t.key for t in full[4:]]
