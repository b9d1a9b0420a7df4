"""RULER's synthetic tasks (``longctx.eval.ruler``, ``longctx eval ruler``): the scorer against RULER's own scoring
functions, the generator's inputs against RULER's generator's for the same settings, each task's rule, the runner
(resume) and the command."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

import longctx
from longctx.cli import app
from longctx.eval import ruler

pytest.importorskip("wonderwords")
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tok(stories_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_path)


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2-135M-Instruct's tokenizer (from its GGUF): RULER's own generator ran with it for the fixture."""
    from transformers import AutoTokenizer

    from longctx.loading import resolve_model_path

    folder, gguf = resolve_model_path("smollm2")
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def test_scorer_equals_rulers_own_functions():
    """``tests/eval/ruler_scores.json``: predictions scored by RULER's scripts/eval/synthetic/constants.py."""
    fixture = json.loads((HERE / "ruler_scores.json").read_text())
    for case in fixture["cases"]:
        assert ruler.string_match_all(case["preds"], case["refs"]) == case["string_match_all"]
        assert ruler.string_match_part(case["preds"], case["refs"]) == case["string_match_part"]
    assert ruler.postprocess_pred("  a\x07b\n ") == "a\nb"
    assert ruler.score("niah_multivalue", " 1, 2 and\x003", ["1", "2", "3", "4"]) == 75.0


def test_effective_length_is_the_longest_unbroken_run_above_the_bar():
    assert ruler.effective_length({4096: 90.0, 8192: 86.0, 16384: 80.0, 32768: 88.0}) == 8192
    assert ruler.effective_length({4096: 85.5}) is None
    assert ruler.effective_length({4096: 85.6, 8192: 85.6}) == 8192


def _shape(text: str) -> str:
    """A line with what RULER draws at random masked: numbers, uuids, adjective-noun keys, variable names, words."""
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<uuid>", text)
    text = re.sub(r"\b\d+\b", "<n>", text)
    text = re.sub(r"\b[A-Z]{3,5}\b", "<VAR>", text)
    text = re.sub(r"\b[a-z]+(?:-[a-z]+)+\b", "<key>", text)
    # word lists (CWE's numbered words, FWE's coded words and dots): a run of 8 items or more is one <list>
    item = r"(?:(?:<n>\. )?(?:[a-z']+|<key>)|\.\.\.)"
    return re.sub(rf"{item}(?: {item}){{7,}}", "<list>", text)


@pytest.mark.parametrize("name", ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe"])
def test_inputs_have_rulers_format(smol_tok, name):
    """Against RULER's generator run with the same tokenizer and settings (``ruler_samples.json``): the same lines
    around the haystack (instruction, question, answer prefix) once the drawn values are masked, the same number of
    references, and both fill the length to within RULER's haystack step."""
    fixture = json.loads((HERE / "ruler_samples.json").read_text())["samples"]
    theirs = fixture[f"{name}@4096"][0]
    ours = ruler.ruler_sample(name, 4096, smol_tok, seed=1)
    for part in ("input", "answer_prefix"):
        a, b = ours.to_dict()[part], theirs[part]
        a_lines, b_lines = a.split("\n"), b.split("\n")
        assert _shape(a_lines[-1]) == _shape(b_lines[-1])  # the question / the prefix
        if name != "vt":  # vt starts with its in-context example, whose names and value are redrawn
            assert _shape(a_lines[0]) == _shape(b_lines[0])
        assert {_shape(x) for x in a_lines} == {_shape(x) for x in b_lines}
    assert len(ours.outputs) == len(theirs["outputs"])
    assert ours.length <= 4096 and theirs["length"] <= 4096
    # both are RULER's sizing: the largest haystack that fits, stepped back by one haystack increment when the
    # final sample overflows by a token (vt: 10 noise lines). CWE: RULER draws the sample's words afresh after the
    # search (ours are the searched draw itself), so its input can be a step of 10 words (30 listed items) shorter
    # for stepping back and about as much for the draw: two steps
    step = 0.05 * 4096
    if name == "vt":
        step = count(smol_tok, "\n".join([ruler.NOISE] * 10))
    elif name == "cwe":
        step = 2 * count(smol_tok, " ".join(re.findall(r"\d+\. [a-z]+", ours.input)[-30:]))
    assert abs(ours.length - theirs["length"]) <= step


def test_niah_answers_are_in_the_input_and_the_question_names_the_keys(tok):
    for name in ("niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery"):
        s = ruler.ruler_sample(name, 4096, tok, seed=3)  # essay: 500-word steps
        needles = re.findall(r"One of the special magic numbers? for (\S+) is: (\d+)\.", s.input)
        assert all(v in s.input for v in s.outputs) and len(s.outputs) == (4 if "multi" in name and "key" not in name
                                                                           else 1)
        keys = {k for k, v in needles if v in s.outputs}
        assert keys and all(k in s.input.split("\n")[-1] for k in keys)
        assert s.answer_prefix.startswith(" The special magic number")
        assert 0.5 * 4096 <= s.length <= 4096
    a, b = ruler.ruler_sample("niah_single_1", 2048, tok, seed=3), ruler.ruler_sample("niah_single_1", 2048, tok, 3)
    assert a == b and ruler.ruler_sample("niah_single_1", 2048, tok, seed=4).outputs != a.outputs
    assert 0.95 * 2048 <= a.length <= 2048


def test_variable_tracking_chain(tok):
    s = ruler.ruler_sample("vt", 2048, tok, seed=5)
    value = re.search(r"assigned the value (\d+)", s.answer_prefix).group(1)
    chain = [f"VAR {s.outputs[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(s.outputs, s.outputs[1:])]
    body = s.input.split("Memorize and track")[2]  # after the in-context example
    assert all(line in body for line in chain) and "5 variables" in s.answer_prefix
    example = s.input.split("Memorize and track")[1]
    assert "12345" not in example and re.search(r"they are:\s+(\b[A-Z]{3}\b ?){5}", example)


def test_common_and_frequent_words_are_the_most_frequent(tok):
    s = ruler.ruler_sample("cwe", 2048, tok, seed=2)
    listed = Counter(re.findall(r"\d+\. (\S+)", s.input.split("Below is a numbered list")[2]))
    assert set(s.outputs) == {w for w, _ in listed.most_common(10)}
    f = ruler.ruler_sample("fwe", 2048, tok, seed=2)
    words = Counter(w for w in f.input.split("coded words. ")[1].split("\n")[0].split() if w != "...")
    assert [w for w, _ in words.most_common(3)] == f.outputs


def test_fit_finds_the_largest_size_past_a_large_fixed_part():
    """An input with a fixed part far larger than one step (CWE's worked example) makes the tokens per step, taken
    from one input, an overestimate: the search must still reach the largest size that fits."""
    def make(n):
        return "x " * (1000 + n)

    def count(text):
        return len(text.split())

    assert ruler._fit(make, count, 2000, 10) == 1000
    assert ruler._fit(make, count, 2000, 10, cap=300) == 300  # CWE stops at its word list, as RULER does
    assert ruler._fit(make, count, 1005, 10) == 10  # not even one step fits: the smallest size


@pytest.mark.parametrize("length", [4096, 8192, 16384])
def test_cwe_fills_its_length(smol_tok, length):
    """CWE's input fills the length it is reported at (its worked example once cut it to 4572 tokens at 8192 and
    6064 at 16384), within one step of 10 words."""
    s = ruler.ruler_sample("cwe", length, smol_tok, seed=ruler.sample_seed(0, length, 0))
    assert length - 200 <= s.length <= length, s.length


@pytest.mark.slow  # 11 inputs of 16k tokens fitted by bisection: about two minutes
@pytest.mark.parametrize("length", [8192, 16384])
def test_every_task_fills_its_length(smol_tok, length):
    """Each input fills the length it is reported at, within RULER's own slack (FWE steps back one increment of
    budget / 32; the others one haystack step)."""
    for name in ruler.TASKS:
        s = ruler.ruler_sample(name, length, smol_tok, seed=ruler.sample_seed(0, length, 0))
        assert 0.93 * length <= s.length <= length, (name, s.length)


def test_a_length_a_task_cannot_fit_is_refused(tok):
    with pytest.raises(ValueError, match="no input fits 512 tokens"):
        ruler.ruler_sample("niah_single_1", 512, tok)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.ruler_sample("qa_1", 4096, tok)


def test_grid_resumes_and_summarises(stories_path, tok, tmp_path):
    from longctx.eval.runner import ResultsLog

    model = longctx.load(stories_path)
    log = ResultsLog.open(tmp_path / "t.jsonl", resume=False)
    rows = ruler.ruler_grid(model, tok, ["vanilla"], [2048], ["niah_single_1", "fwe"], samples=2, log=log,
                            progress=False, batch_size=2)
    assert len(rows) == 4 and all(r["tokens"] <= 2048 and 0 <= r["score"] <= 100 for r in rows)
    again = ruler.ruler_grid(model, tok, ["vanilla"], [2048], ["niah_single_1", "fwe"], samples=2,
                             log=ResultsLog.open(tmp_path / "t.jsonl", resume=True), progress=False)
    assert [r["pred"] for r in again] == [r["pred"] for r in rows]  # nothing run again
    one = ruler.ruler_grid(model, tok, ["vanilla"], [2048], ["niah_single_1"], samples=1, progress=False)
    assert one[0]["pred"] == rows[0]["pred"]  # batched (left-padded) and alone: the same greedy answer
    (summary,) = ruler.ruler_summary(rows)
    assert summary["samples"] == 4 and set(summary["tasks"]) == {"niah_single_1", "fwe"}
    assert summary["effective_length"] == (2048 if summary["average"] >= 85.6 else None)


def test_cli(stories_path, tmp_path):
    runner = CliRunner()
    base = ["eval", "ruler", "--model", str(stories_path)]
    for argv, says in ((["--tasks", "qa_1"], "--tasks: unknown qa_1"), (["--samples", "0"], "--samples"),
                       (["--resume"], "--resume continues"), (["--lengths", "512"], "no input fits 512")):
        bad = runner.invoke(app, base + argv)
        assert bad.exit_code == 2 and says in " ".join(bad.output.split())
    ok = runner.invoke(app, base + ["--lengths", "2048", "--tasks", "niah_single_1", "--out", str(tmp_path / "o"),
                                    "--compare", "vanilla,pi"])
    assert ok.exit_code == 0, ok.output
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["summary"][0]["tasks"].keys() == {"niah_single_1"} and "effective length" in ok.output
    for png in ("ruler_vanilla_heatmap.png", "ruler_pi_heatmap.png", "ruler_average_heatmap.png"):
        assert (tmp_path / "o" / png).stat().st_size > 0
