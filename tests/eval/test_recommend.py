"""``longctx recommend`` / ``longctx.patch(model, "auto")``: every applicable variant measured at N, ranked by its
evidence, bounded by a budget, the winner applied with the evidence kept."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, TRAINED, build_bert, build_sentence_transformer
from typer.testing import CliRunner

import longctx
from longctx.cli import app
from longctx.eval.recommend import candidates, recommend

runner = CliRunner()


@pytest.fixture(scope="module")
def stories(stories_path):
    from longctx.loading import load_model

    return load_model(str(stories_path))


@pytest.fixture(scope="module")
def tinystories_text(stories_path):
    return (REPO.parent / "shared" / "data" / "tinystories" / "tinystories_a.txt").read_text()


def test_candidates_are_every_applicable_variant_retargeted(stories):
    found = candidates(stories.model, 2048)
    names = {m for m, _ in found}
    assert {"pi", "ntk", "dynamic_ntk", "yarn", "selfextend", "dca", "rerope", "clex"} <= names
    assert "grouped" not in names and "v2pe" not in names  # absolute / vision-language methods do not apply
    assert all(p["target_length"] == 2048 and "factor" not in p for _, p in found)
    assert ("dynamic_ntk", {"cache_consistent": True, "target_length": 2048}) in found
    assert ("clex", {"max_factor": 4, "target_length": 2048}) in found  # sized to reach N


def test_recommend_ranks_by_the_evidence_and_auto_applies_the_winner(stories, tinystories_text):
    model, tok = stories.model, stories.tokenizer
    found = recommend(model, 1024, tokenizer=tok, text=tinystories_text, methods=["pi", "yarn", "ntk"])
    ranked = [r for r in found.rows if r["rank"] is not None]
    assert [r["rank"] for r in ranked] == [1, 2, 3] and found.rows[-1]["method"] == "vanilla"
    # the budget allowed RULER (decided on the reference): the subset's tasks that fit 1024 tokens of stories260K
    assert found.measured["ruler"].startswith("RULER fwe at 1024 tokens, one sample each")
    assert "niah_single_2: no input fits 1024 tokens" in found.measured["ruler"]
    keys = [(-r["ruler"], -r["passkey"], r["ppl"]) for r in ranked]
    assert keys == sorted(keys)  # RULER first, then passkey accuracy, then perplexity
    assert found.measured["perplexity"] == "one window of 1024 tokens" and not longctx.is_patched(model)
    winner = found.winner
    assert found.patch_line().startswith(f'longctx.patch(model, "{winner["method"]}"')
    assert found.export_line("stories") == f"longctx export stories OUT --method {winner['method']} --target-length 1024"
    # auto: the same sweep, the winner applied, the evidence kept on the patch
    info = longctx.patch(model, "auto", target_length=1024, tokenizer=tok, text=tinystories_text,
                         methods=["pi", "yarn", "ntk"])
    try:
        assert info.method == winner["method"] and info.target_length == 1024
        assert longctx.patch_info(model).evidence["winner"]["method"] == winner["method"]
        assert [r["ppl"] for r in info.evidence["rows"]] == pytest.approx([r["ppl"] for r in found.rows])
        assert any(n.startswith("chosen by longctx.recommend at 1024 tokens") for n in info.notes)
    finally:
        longctx.unpatch(model)


def test_the_budget_bounds_the_sweep_and_says_what_it_left_out(stories, tinystories_text):
    found = recommend(stories.model, 1024, tokenizer=stories.tokenizer, text=tinystories_text, budget_s=0.01,
                      methods=["pi", "yarn", "ntk"])
    assert len(found.rows) == 2  # the reference and the first candidate always run
    assert [s["method"] for s in found.not_measured] == ["ntk", "yarn"]
    assert all("budget" in s["why"] for s in found.not_measured)
    # no room for RULER: left out for every candidate, said, and the ranking is passkey then perplexity
    assert found.measured["ruler"].startswith("left out by the budget: perplexity and passkey alone took")
    assert found.measured["rank_by"] == "passkey accuracy, then perplexity"
    assert not any("ruler" in r for r in found.rows)


def test_ruler_in_the_evidence_scores_the_same_inputs_for_every_candidate(stories, tinystories_text):
    """ruler=True: the subset's tasks that fit N, one input each (RULER's seed for sample 0 at N), the same for the
    reference and every candidate; each row's scores are RULER's metric on the patched model's greedy answer."""
    from longctx.eval.ruler import ruler_sample, run_samples, sample_seed

    model, tok = stories.model, stories.tokenizer
    found = recommend(model, 2048, tokenizer=tok, text=tinystories_text, methods=["yarn"], tune=0, ruler=True)
    tasks = ["niah_single_2", "vt", "fwe"]  # niah_multikey_1 and niah_multivalue need > 2048 stories260K tokens
    assert found.measured["ruler"].startswith(f"RULER {', '.join(tasks)} at 2048 tokens")
    assert "niah_multikey_1: no input fits 2048 tokens (the smallest is" in found.measured["ruler"]
    assert found.measured["rank_by"] == "RULER average, then passkey accuracy, then perplexity"
    for row in found.rows:
        assert list(row["ruler_tasks"]) == tasks and all(0 <= v <= 1 for v in row["ruler_tasks"].values())
        assert row["ruler"] == pytest.approx(sum(row["ruler_tasks"].values()) / 3)
    samples = [ruler_sample(t, 2048, tok, sample_seed(0, 2048, 0)) for t in tasks]
    with longctx.patched(model, "yarn", **found.winner["params"]):
        again = run_samples(model, tok, samples)
    assert [v / 100 for v in again] == pytest.approx(list(found.winner["ruler_tasks"].values()))


def test_ruler_asked_for_where_it_cannot_run_is_refused_before_any_work(stories, tinystories_text, monkeypatch):
    import longctx.eval.recommend as rec

    monkeypatch.setattr(rec, "RULER_SUBSET", ("vt",))  # vt needs more than 1024 stories260K tokens
    with pytest.raises(ValueError, match=r"ruler=True: no task of the RULER subset fits 1024 tokens .*vt: no input "
                                         r"fits 1024 tokens \(the smallest is \d+\)"):
        recommend(stories.model, 1024, tokenizer=stories.tokenizer, text=tinystories_text, ruler=True)
    found = recommend(stories.model, 1024, tokenizer=stories.tokenizer, text=tinystories_text, methods=["pi"],
                      tune=0)  # when the budget allows, but nothing fits: left out, said
    assert found.measured["ruler"].startswith("left out: no task of the subset fits 1024 tokens (vt: no input fits")
    assert not longctx.is_patched(stories.model)


def test_a_variant_that_cannot_reach_n_is_listed_not_run(stories, tinystories_text):
    found = recommend(stories.model, 4096, tokenizer=stories.tokenizer, text=tinystories_text,
                      methods=["selfextend"], budget_s=0.01)
    (fixed,) = [s for s in found.not_measured if s["params"].get("group_size") == 4]
    assert "reach at most" in fixed["why"]
    assert found.winner["method"] == "selfextend" and found.winner["params"]["shift"] == "float"


def test_recommend_on_an_embedding_model(tmp_path):
    st = build_sentence_transformer(build_bert(), tmp_path / "st")
    found = recommend(st, 2 * TRAINED, docs=3, methods=["grouped", "pcw"])
    assert found.kind == "encoder" and found.rows[-1]["method"] == "truncate"
    assert {"passkey", "needle", "retrieval"} <= set(found.winner)
    keys = [(-r["retrieval"], -r["passkey"]) for r in found.rows if r["rank"]]
    assert keys == sorted(keys) and st.max_seq_length == TRAINED  # the model left as found
    assert "ruler" not in found.measured
    with pytest.raises(ValueError, match="ruler=True: RULER measures decoders"):
        recommend(st, 2 * TRAINED, docs=3, methods=["grouped"], ruler=True)


def test_recommend_command_answers_bad_input_before_any_work(stories_path, tmp_path):
    low = runner.invoke(app, ["recommend", str(stories_path), "--target-length", "256"])
    assert low.exit_code == 2 and "must be longer than" in low.output and "trained length (512)" in low.output
    unknown = runner.invoke(app, ["recommend", str(stories_path), "--target-length", "1024", "--compare", "yarnn"])
    assert unknown.exit_code == 2 and "yarnn" in unknown.output
    tune = runner.invoke(app, ["recommend", str(stories_path), "--target-length", "1024", "--tune", "-1"])
    assert tune.exit_code == 2 and "--tune must be an integer >= 0, got -1" in tune.output


def test_recommend_command_prints_the_table_and_the_winner(stories_path, tmp_path):
    text = REPO.parent / "shared" / "data" / "tinystories" / "tinystories_a.txt"
    result = runner.invoke(app, ["recommend", str(stories_path), "--target-length", "1024", "--compare", "pi,yarn",
                                 "--text", str(text), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "recommendation.json").read_text())
    assert saved["patch"] in result.output and saved["export"] in result.output
    assert "longctx recommend — stories260K at 1024 tokens" in " ".join(result.output.split())
    assert saved["measured"]["ruler"].startswith("RULER fwe at 1024 tokens") and "ruler" in saved["winner"]
    off = runner.invoke(app, ["recommend", str(stories_path), "--target-length", "1024", "--compare", "pi",
                              "--text", str(text), "--tune", "0", "--no-ruler", "--json"])
    assert off.exit_code == 0, off.output
    assert "ruler" not in json.loads(off.output[off.output.index("{"):])["measured"]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs target_length=N"),
    ({"target_length": "1024"}, "target_length must be an integer number of tokens, got '1024'"),
    ({"target_length": 256}, r"target_length \(256\) must be longer than the trained length \(512\)"),
    ({"target_length": 1024, "budget_s": -1}, "budget_s must be a number of seconds > 0, got -1"),
    ({"target_length": 1024, "methods": ["yarnn"]}, r"unknown method\(s\) \['yarnn'\]; available: pi, ntk"),
    ({"target_length": 1024, "ruler": "yes"},
     "ruler must be None \\(when the budget allows\\), True or False, got 'yes'"),
])
def test_auto_refuses_bad_arguments_before_any_work_and_keeps_the_earlier_patch(stories, kwargs, message):
    model = stories.model
    longctx.patch(model, "pi", factor=2)
    try:
        with pytest.raises(ValueError, match=message):
            longctx.patch(model, "auto", tokenizer=stories.tokenizer, **kwargs)
        info = longctx.patch_info(model)
        assert info.method == "pi" and info.target_length == 1024 and info.evidence is None
    finally:
        longctx.unpatch(model)


def test_a_patched_model_is_measured_as_trained_and_keeps_its_patch(stories, tinystories_text):
    model = stories.model
    plain = recommend(model, 1024, tokenizer=stories.tokenizer, text=tinystories_text, methods=["yarn"], ruler=False)
    longctx.patch(model, "pi", factor=2)
    try:
        found = recommend(model, 1024, tokenizer=stories.tokenizer, text=tinystories_text, methods=["yarn"],
                          ruler=False)
        assert [r["ppl"] for r in found.rows] == [r["ppl"] for r in plain.rows]  # the vanilla reference too
        assert longctx.patch_info(model).method == "pi"
    finally:
        longctx.unpatch(model)


def test_auto_never_applies_a_method_measured_worse_than_the_model_as_it_is(stories, tinystories_text):
    """At 2x, position interpolation is measured worse than stories260K as it is: 'auto' leaves the model unpatched
    and says so (it applied it before); recommend marks that no candidate improves."""
    from longctx.eval.recommend import NoImprovement

    found = recommend(stories.model, 2 * 512, tokenizer=stories.tokenizer, text=tinystories_text, methods=["pi"],
                      ruler=False)
    reference = next(r for r in found.rows if r["rank"] is None)
    assert found.winner["ppl"] > reference["ppl"] and not found.improves
    assert found.winner["beats_reference"] is False
    with pytest.raises(NoImprovement, match="no candidate measured better than the model as it is") as caught:
        longctx.patch(stories.model, "auto", target_length=2 * 512, tokenizer=stories.tokenizer,
                      text=tinystories_text, methods=["pi"], ruler=False)
    assert not longctx.is_patched(stories.model)
    assert caught.value.recommendation.rows[0]["method"] == "pi"


def test_recommend_tunes_the_best_ranked_methods_apart_from_the_evidence_window(stories, tinystories_text):
    """The ranking keeps 40 % of the budget for tuning; the two best-ranked methods with a search space are searched
    on the text's second window; a tuned candidate that beats its defaults there is measured and ranked like the
    rest, and its parameters reproduce its figures."""
    from longctx.eval.perplexity import perplexity, token_ids

    model, tok = stories.model, stories.tokenizer
    found = recommend(model, 2048, tokenizer=tok, text=tinystories_text, methods=["rerope", "selfextend", "pi"],
                      tune_trials=6, ruler=False)
    assert "ruler" not in found.measured
    assert "second window of 2048 tokens" in found.measured["tuning"]
    assert {t["method"] for t in found.tuning} == {"rerope", "selfextend"}  # pi has no search space
    for t in found.tuning:
        assert t["candidates"] == 6 and t["best_ppl"] <= t["default_ppl"]
        assert t["improved"] == (t["best_ppl"] < t["default_ppl"])
    tuned = [r for r in found.rows if r.get("tuned")]
    assert {r["method"] for r in tuned} == {t["method"] for t in found.tuning if t["improved"]}
    assert tuned, "rerope's default window is beaten within a few candidates at 4x"
    ids = token_ids(tok, tinystories_text)
    for row in tuned:
        assert row["params"]["target_length"] == 2048 and row["rank"] >= 1
        with longctx.patched(model, row["method"], **row["params"]):
            evidence = perplexity(model, ids, 2048, max_windows=1, progress=False).ppl
            tuning = perplexity(model, ids[2048:4096], 2048, max_windows=1, progress=False).ppl
        assert evidence == pytest.approx(row["ppl"], rel=1e-6)
        t = next(t for t in found.tuning if t["method"] == row["method"])
        assert tuning == pytest.approx(t["best_ppl"], rel=1e-6)
    plain = recommend(model, 2048, tokenizer=tok, text=tinystories_text, methods=["rerope"], tune=0,
                      budget_s=0.01)
    assert not plain.tuning and not any(r.get("tuned") for r in plain.rows) and "tuning" not in plain.measured
    with pytest.raises(ValueError, match="tune must be an integer >= 0"):
        recommend(model, 2048, tokenizer=tok, text=tinystories_text, tune=-1)
    with pytest.raises(ValueError, match="tune_trials must be an integer >= 1"):
        recommend(model, 2048, tokenizer=tok, text=tinystories_text, tune_trials=0)
