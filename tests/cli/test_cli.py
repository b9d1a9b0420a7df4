"""The ``longctx`` command line: methods, inspect, eval ppl (JSON + CSV written atomically)."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import build
from typer.testing import CliRunner

from longctx.cli import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("methods", "inspect", "eval"):
        assert command in result.output


def test_methods_json():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    names = {m["name"] for m in json.loads(result.output)}
    assert {"pi", "ntk", "dynamic_ntk", "yarn"} <= names


def test_inspect_model_dir(tmp_path):
    model = build("gemma3_text")
    model.save_pretrained(tmp_path)
    result = runner.invoke(app, ["inspect", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["model_type"] == "gemma3_text" and info["trained_length"] == 64
    assert info["extended_layer_types"] == ["full_attention"] and "yarn" in info["methods"]
    table = runner.invoke(app, ["inspect", str(tmp_path)])
    assert table.exit_code == 0 and "trained_length" in table.output


def test_inspect_missing_path_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.startswith("longctx: error: no model at") and result.output.count("\n") == 1


def test_eval_ppl_writes_results(stories_path, tmp_path):
    text = stories_path.parents[1] / "data" / "tinystories" / "tinystories_valid_subset.txt"
    out = tmp_path / "res"
    result = runner.invoke(app, [
        "eval", "ppl", "--model", str(stories_path), "--text", str(text), "--lengths", "512,1024",
        "--compare", "vanilla,yarn", "--max-windows", "2", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "results.json").read_text())
    rows = payload["rows"]
    assert [(r["method"], r["length"]) for r in rows] == [("vanilla", 512), ("vanilla", 1024), ("yarn", 1024)]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longctx.eval.perplexity import perplexity, token_ids

    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    ids = token_ids(AutoTokenizer.from_pretrained(stories_path), text.read_text())
    assert rows[0]["ppl"] == pytest.approx(perplexity(model, ids, 512, max_windows=2, progress=False).ppl, rel=1e-6)
    assert rows[0]["windows"] == 2 and rows[2]["ppl_past_split"] is not None
    assert payload["versions"]["transformers"].startswith("5.")
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert not list(out.glob("*.tmp"))


def test_method_params_parsing():
    import typer

    from longctx.cli.common import method_params

    assert method_params(["selfextend.group_size=16", "selfextend.shift=float", "yarn.beta_fast=16.5"], None) == {
        "selfextend": {"group_size": 16, "shift": "float"},
        "yarn": {"beta_fast": 16.5},
    }
    assert method_params(["self_extend.window=8"], ["selfextend"]) == {"selfextend": {"window": 8}}  # an alias
    with pytest.raises(typer.Exit):
        method_params(["group_size=16"], None)


def test_param_for_a_method_not_evaluated_is_an_error(stories_path):
    """--param for a method that does not run (here: not among the default methods) is refused, not ignored."""
    result = runner.invoke(app, ["eval", "ppl", "--model", str(stories_path), "--param", "selfextend.window=8"])
    assert result.exit_code == 2
    assert "--param sets 'selfextend' parameters but the methods evaluated are vanilla, yarn" in result.output
    explicit = runner.invoke(app, ["eval", "ppl", "--model", str(stories_path), "--compare", "vanilla,yarn",
                                   "--param", "pi.factor=2"])
    assert explicit.exit_code == 2 and "'pi' is not evaluated" in explicit.output


@pytest.mark.parametrize("command", [["eval", "ppl", "--lengths", "1024"], ["eval", "passkey", "--lengths", "1024"]])
def test_a_parameter_the_model_does_not_allow_fails_before_any_cell(stories_path, tmp_path, capsys, command):
    """rerope's window must be below the trained length (512): known only once the model is read, refused by the
    sweep's check of every patch before the first cell (vanilla, here) runs — one line, exit code 2."""
    from longctx.cli import main

    text = stories_path.parents[1] / "data" / "tinystories" / "tinystories_valid_subset.txt"
    extra = ["--text", str(text)] if command[1] == "ppl" else []
    out = tmp_path / "res"
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--model", str(stories_path), *extra, "--compare", "vanilla,rerope", "--param",
              "rerope.window=4096", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after transformers' weight-loading bar
    assert err == "longctx: error: rerope: window=4096 must be smaller than the trained length 512"
    assert not (out / "results.json").exists()
    trials = out / "trials.jsonl"  # passkey's resumable log: no trial ran
    assert not trials.exists() or trials.read_text() == ""
