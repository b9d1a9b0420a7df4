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
    assert config["max_position_embeddings"] == 256 and config["rope_parameters"]["factor"] == 4.0

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
