"""The published RULER results agree with their own log: every recorded sample re-scored by RULER's metric, the
summary recomputed from the samples, and docs/results.md's table read back against that summary (no model: the
predictions are in ``bench/ruler.smollm2.json``)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from longctx.eval.ruler import TASKS, ruler_summary, score

ROOT = Path(__file__).resolve().parents[2]
RESULTS = json.loads((ROOT / "bench" / "ruler.smollm2.json").read_text())


def test_every_sample_rescored_by_rulers_metric() -> None:
    rows = RESULTS["rows"]
    assert rows and {r["subtask"] for r in rows} == set(TASKS)
    for r in rows:
        assert score(r["subtask"], r["pred"], r["outputs"]) == pytest.approx(r["score"], abs=1e-9), r["subtask"]
        # each input fits, and fills, the length it is reported at (RULER's slack: FWE steps back budget / 32)
        assert 0.93 * r["length"] <= r["tokens"] <= r["length"], (r["subtask"], r["length"], r["tokens"])


def test_summary_is_the_samples_mean_and_cells_are_whole() -> None:
    rows = RESULTS["rows"]
    cells = {(r["method"], r["length"]) for r in rows}
    for method, length in cells:  # one sample of each of RULER's tasks per published cell, nothing partial
        mine = sorted(r["subtask"] for r in rows if (r["method"], r["length"]) == (method, length))
        assert mine == sorted(TASKS) * RESULTS["samples"], (method, length)
    recomputed = {(s["method"], s["length"]): s for s in ruler_summary(rows)}
    published = {(s["method"], s["length"]): s for s in RESULTS["summary"]}
    assert recomputed.keys() == published.keys() == cells
    for key, s in published.items():
        assert recomputed[key]["average"] == pytest.approx(s["average"])
        assert recomputed[key]["tasks"] == pytest.approx(s["tasks"])
        assert recomputed[key]["effective_length"] == s["effective_length"]


def _docs_table() -> tuple[list[int], dict[str, list[str]]]:
    """The per-method table of docs/results.md's RULER section: its length columns and each method's cells."""
    text = (ROOT / "docs" / "results.md").read_text()
    section = text.split("## RULER on SmolLM2", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    lengths = [int(c) for c in columns[1:] if c.isdigit()]
    table = {}
    for line in lines[header + 2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(columns):
            break
        table[cells[0].split(" ")[0]] = [re.sub(r"\*", "", c) for c in cells[1:]]
    return lengths, table


def test_docs_table_matches_the_results() -> None:
    lengths, table = _docs_table()
    published = {(s["method"], s["length"]): s["average"] for s in RESULTS["summary"]}
    effective = {s["method"]: s["effective_length"] for s in RESULTS["summary"]}
    assert lengths == RESULTS["lengths"]
    assert set(table) == set(RESULTS["methods"])
    for method, cells in table.items():
        assert cells[len(lengths)] == str(effective[method] or "none"), method  # the effective-length column
        for n, cell in zip(lengths, cells):
            if (method, n) in published:
                assert cell == f"{published[(method, n)]:.1f}", (method, n)
            else:
                assert cell == "—", (method, n)  # a cell not measured is shown as not measured
