"""``longctx.search`` / ``longctx search``: LongRoPE's factor search — the factor space, the seeds against their
definitions, never worse than the best seed, reproducible with a seed, bounded, honest; the export loads in plain
transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO
from typer.testing import CliRunner

import longctx
from longctx.cli import app
from longctx.core.rope import default_inv_freq, ntk_factors, yarn_inv_freq
from longctx.patches.longrope import decode, encode, seeds

runner = CliRunner()


@pytest.fixture(scope="module")
def stories(stories_path):
    from longctx.loading import load_model

    return load_model(str(stories_path))


@pytest.fixture(scope="module")
def text(stories_path):
    return (REPO.parent / "shared" / "data" / "tinystories" / "tinystories_a.txt").read_text()


def test_the_factor_space_is_monotone_and_round_trips():
    s = 8.0
    for factors in ([1.0, 2.0, 4.0, 8.0], [8.0] * 4, [1.0, 1.0, 1.0, 1.0], [1.2, 1.2, 5.0, 7.9]):
        assert decode(encode(factors, s), s) == pytest.approx(factors, rel=1e-9)
    unit = torch.rand(100, 6, generator=torch.Generator().manual_seed(0)).tolist()
    for u in unit:
        f = decode(u, s)
        assert all(1.0 - 1e-12 <= a <= b + 1e-12 <= s + 1e-9 for a, b in zip(f, f[1:] + [s]))


def test_seeds_are_pi_ntk_and_yarn_per_dimension():
    found = seeds(8, 10000.0, 8.0, 512)
    assert found["pi"][0] == [8.0] * 4
    assert found["ntk"][0] == pytest.approx(ntk_factors(8, 8.0))
    yarn = default_inv_freq(8, 10000.0).double() / torch.tensor(found["yarn"][0], dtype=torch.float64)
    torch.testing.assert_close(yarn, yarn_inv_freq(8, 10000.0, 8.0, 512).double(), rtol=1e-6, atol=0)
    assert found["yarn"][1] == pytest.approx(0.1 * math.log(8) + 1)
    assert found["pi"][1] == pytest.approx(math.sqrt(1 + math.log(8) / math.log(512)))


def test_search_is_bounded_reproducible_and_never_worse_than_its_seeds(stories, text):
    kwargs = dict(target_length=1024, tokenizer=stories.tokenizer, text=text, budget_s=600, max_trials=6, windows=1)
    first = longctx.search(stories.model, "longrope", seed=3, **kwargs)
    assert [r["source"] for r in first.rows[:3]] == ["pi", "ntk", "yarn"] and len(first.rows) == 6
    assert first.best["ppl"] == min(r["ppl"] for r in first.rows) <= min(r["ppl"] for r in first.rows[:3])
    assert first.stopped == "max_trials (6) reached" and "1 window(s)" in first.measured
    assert not longctx.is_patched(stories.model)
    again = longctx.search(stories.model, "longrope", seed=3, **kwargs)
    assert [r["ppl"] for r in again.rows] == [r["ppl"] for r in first.rows]
    # the winner, patched: its perplexity as measured
    from longctx.eval.perplexity import perplexity, token_ids

    with longctx.patched(stories.model, "longrope", **first.params):
        ppl = perplexity(stories.model, token_ids(stories.tokenizer, text), 1024, max_windows=1, progress=False).ppl
    assert ppl == pytest.approx(first.best["ppl"], rel=1e-6)
    # a tiny budget still runs the seeds, and says the budget stopped it
    short = longctx.search(stories.model, "longrope", target_length=1024, tokenizer=stories.tokenizer, text=text,
                           budget_s=0.01, windows=1)
    assert len(short.rows) == 3 and short.stopped.startswith("budget")


@pytest.mark.parametrize("kwargs, message", [
    ({"budget_s": 0}, "budget_s must be"), ({"target_length": 512}, "not longer than the trained length"),
    ({"windows": 0}, "windows must be"), ({"max_trials": 0}, "max_trials must be"),
    ({"target_length": 10**6}, "fewer than 2 window"), ({"method": "yarn"}, "searches longrope")])
def test_bad_arguments_are_refused_before_any_work(stories, text, kwargs, message):
    args = {"method": "longrope", "target_length": 1024, "tokenizer": stories.tokenizer, "text": text, **kwargs}
    method = args.pop("method")
    with pytest.raises(ValueError, match=message):
        longctx.search(stories.model, method, **args)


def test_search_command_prints_the_candidates_and_exports_the_winner(stories_path, tmp_path, text):
    out, export = tmp_path / "out", tmp_path / "export"
    text_file = tmp_path / "search.txt"
    text_file.write_text(text)
    result = runner.invoke(app, ["search", str(stories_path), "--target-length", "1024", "--text", str(text_file),
                                 "--max-trials", "4", "--windows", "1", "--out", str(out), "--export", str(export)])
    assert result.exit_code == 0, result.output
    assert "stopped: max_trials (4) reached; 4 candidates" in result.output and "apply:" in result.output
    found = json.loads((out / "search.json").read_text())
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(export).eval()  # no longctx: a standard longrope config
    assert plain.config.rope_parameters["rope_type"] == "longrope"
    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    longctx.patch(model, "longrope", **found["params"])
    ids = torch.randint(0, 512, (1, 1024), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    for argv, message in ((["--method", "bogus"], "searches longrope"), (["--export", str(export)], "exists"),
                          (["--budget", "0"], "--budget must be"),
                          (["--config-for", "tgi"], "--config-for must be one of transformers, vllm, sglang"),
                          (["--config-for", "vllm"], "--config-for applies with --export")):
        bad = runner.invoke(app, ["search", str(stories_path), "--target-length", "1024", *argv])
        assert bad.exit_code == 2 and message in bad.output


@pytest.mark.parametrize("method, n", [("selfextend", 2048), ("dca", 2048), ("rerope", 2048), ("string", 768)])
def test_an_attention_method_is_tuned_from_its_defaults(stories, text, method, n):
    """The method's defaults at N run first; the winner is never worse on the search text and its parameters
    reproduce its perplexity; a candidate the method refuses is listed with the reason, not scored."""
    from longctx.eval.perplexity import perplexity, token_ids

    found = longctx.search(stories.model, method, target_length=n, tokenizer=stories.tokenizer, text=text,
                           max_trials=8, windows=1, seed=0)
    first = found.rows[0]
    assert first["source"] == "default" and first["params"] == {"target_length": n} and len(found.rows) == 8
    assert found.best["ppl"] == min(r["ppl"] for r in found.rows if r["ppl"] is not None) <= first["ppl"]
    assert all(r["why"] and r["source"] == "search" for r in found.rows if r["ppl"] is None)
    assert found.space and not longctx.is_patched(stories.model)
    with longctx.patched(stories.model, method, **found.params):
        ppl = perplexity(stories.model, token_ids(stories.tokenizer, text), n, max_windows=1, progress=False).ppl
    assert ppl == pytest.approx(found.best["ppl"], rel=1e-6)
    if method == "selfextend":  # G too small for W: the reach check refuses it
        assert any("reach at most" in r.get("why", "") for r in found.rows)


def test_every_search_space_holds_its_seeds_and_refuses_what_the_method_cannot_reach(stories):
    """Over the registry: each declared space at 1.5x has valid ranges, and its seeds, as the method resolves them,
    lie inside it (the sampler learns from them); STRING's space past 2L raises naming its reach."""
    from longctx.eval.search import searchable
    from longctx.patches import get_method

    model = stories.model
    assert {"longrope", "selfextend", "dca", "rerope", "string"} <= set(searchable())
    for method in searchable():
        space = get_method(method).tune(model, 768)
        assert space.seeds and space.fixed == {"target_length": 768} and space.note
        for name, params in space.seeds.items():
            with longctx.patched(model, method, **{**space.fixed, **params}) as info:
                assert space.sampled({**params, **info.params}) is not None, (method, name)
    with pytest.raises(ValueError, match="string reaches at most"):
        get_method("string").tune(model, 1024)
    with pytest.raises(ValueError, match="reaches at most"):
        longctx.search(model, "string", target_length=1024, tokenizer=stories.tokenizer, text="x")


def test_search_command_tunes_an_attention_method(stories_path, tmp_path, text):
    text_file = tmp_path / "search.txt"
    text_file.write_text(text)
    result = runner.invoke(app, ["search", str(stories_path), "--method", "rerope", "--target-length", "2048",
                                 "--text", str(text_file), "--max-trials", "3", "--windows", "1", "--out",
                                 str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "longctx search — stories260K, rerope at 2048 tokens" in flat and "default #0" in flat
    assert "window=64" in flat and "searched: window in [8, 256]" in flat
    found = json.loads((tmp_path / "out" / "search.json").read_text())
    assert found["method"] == "rerope" and len(found["rows"]) == 3
    assert f'longctx.patch(model, "rerope", **{json.dumps(found["params"])})' in result.output


def test_search_exports_its_winner_as_gguf(stories_path, tmp_path, text):
    """``--export OUT.gguf``: the winner in llama.cpp's longrope keys and factor tensors."""
    gguf = pytest.importorskip("gguf")
    text_file = tmp_path / "search.txt"
    text_file.write_text(text)
    out = tmp_path / "winner.gguf"
    result = runner.invoke(app, ["search", str(stories_path), "--target-length", "1024", "--text", str(text_file),
                                 "--max-trials", "2", "--windows", "1", "--export", str(out)])
    assert result.exit_code == 0, result.output
    assert "gguf form" in result.output
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["llama.rope.scaling.type"].contents() == "longrope"
    assert {t.name for t in reader.tensors} >= {"rope_factors_long.weight", "rope_factors_short.weight"}
