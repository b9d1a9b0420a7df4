"""``longctx export`` on the command line: the standard form, a longctx block with --param, errors, --overwrite."""

from __future__ import annotations

import json

import torch
from conftest import build
from typer.testing import CliRunner

import longctx
from longctx.cli import app

runner = CliRunner()


def test_export_command(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", str(tmp_path / "src"), str(out), "--method", "yarn",
                                 "--target-length", "256", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["form"] == "config" and report["target_length"] == 256
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == config["rope_scaling"]["rope_type"] == "yarn"
    # the reading every transformers release shares: L in max_position_embeddings and at the top level only
    assert config["max_position_embeddings"] == config["original_max_position_embeddings"] == 64
    assert config["rope_parameters"]["factor"] == 4.0 and "original_max_position_embeddings" not in config["rope_scaling"]

    again = runner.invoke(app, ["export", str(tmp_path / "src"), str(out), "--method", "pi", "--factor", "2"])
    assert again.exit_code == 2 and "overwrite" in again.output
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"  # untouched

    se = runner.invoke(app, ["export", str(tmp_path / "src"), str(out), "--method", "selfextend", "--param",
                             "group_size=4", "--param", "selfextend.window=16", "--overwrite"])
    assert se.exit_code == 0, se.output
    assert "(longctx form)" in " ".join(se.output.split())
    block = json.loads((out / "config.json").read_text())[longctx.api.CONFIG_KEY]
    assert block["method"] == "selfextend" and block["params"]["group_size"] == 4 and block["params"]["window"] == 16
    ids = torch.randint(5, 100, (1, 150))
    longctx.patch(model, "selfextend", group_size=4, window=16)
    with torch.no_grad():
        assert torch.equal(longctx.load(out)(input_ids=ids).logits, model(input_ids=ids).logits)


def test_export_command_errors(tmp_path):
    bad = runner.invoke(app, ["export", str(tmp_path / "missing"), str(tmp_path / "out"), "--method", "yarn",
                              "--factor", "2"])
    assert bad.exit_code == 2 and "no model at" in bad.output
    model = build("llama")
    model.save_pretrained(tmp_path / "src")
    unknown = runner.invoke(app, ["export", str(tmp_path / "src"), str(tmp_path / "out"), "--method", "magic"])
    assert unknown.exit_code == 2 and "unknown method 'magic'" in unknown.output
    assert not (tmp_path / "out").exists()
    assert "export" in runner.invoke(app, ["--help"]).output


def test_export_config_for_on_the_command_line(tmp_path):
    build("llama").save_pretrained(tmp_path / "src")
    bad = runner.invoke(app, ["export", str(tmp_path / "src"), str(tmp_path / "out"), "--method", "yarn",
                              "--factor", "4", "--config-for", "tgi"])
    assert bad.exit_code == 2 and not (tmp_path / "out").exists()
    assert "--config-for must be one of transformers, vllm, sglang, got 'tgi'" in " ".join(bad.output.split())
    ok = runner.invoke(app, ["export", str(tmp_path / "src"), str(tmp_path / "out"), "--method", "yarn",
                             "--factor", "4", "--config-for", "vllm"])
    assert ok.exit_code == 0, ok.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == 256 and config["rope_scaling"]["original_max_position_embeddings"] == 64


def test_verify_answers_with_one_verdict_line_first(tmp_path, monkeypatch):
    build("llama").save_pretrained(tmp_path / "src")
    ok = runner.invoke(app, ["export", str(tmp_path / "src"), str(tmp_path / "out"), "--method", "yarn", "--factor",
                             "4", "--verify"])
    assert ok.exit_code == 0, ok.output
    first = ok.stdout.splitlines()[0]  # progress bars (stderr) aside, the first line said
    assert first.startswith("verify: PASSED — the reloaded export gives the patched model's outputs (max |diff| 0 ")
    assert first.endswith("; no tokenizer: no passkey run")

    import longctx.export.forms as forms

    standard = forms.standard_params
    monkeypatch.setattr(forms, "standard_params", lambda p: {**standard(p), "factor": 2 * p["factor"]})
    bad = runner.invoke(app, ["export", str(tmp_path / "src"), str(tmp_path / "bad"), "--method", "yarn", "--factor",
                              "4", "--verify"])
    assert bad.exit_code == 1 and not (tmp_path / "bad").exists()
    (line,) = [x for x in bad.stderr.splitlines() if x.startswith("verify")]
    assert not bad.stdout.strip()
    assert line.startswith("verify: FAILED — the exported model's outputs differ from the patched model's by ")
