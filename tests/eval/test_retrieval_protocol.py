"""LongEmbed's protocol on a real task (``max_lengths``): texts cut to N tokens with the special tokens, each method
patched to N, embeddings shared where a method leaves inputs unchanged; progress lines; the plots' axes."""

from __future__ import annotations

import torch
from conftest import TRAINED, build_bert, build_sentence_transformer

import pytest

from longctx.eval.progress import progress
from longctx.eval.retrieval import Embedder, retrieval_grid
from longctx.eval.synthetic import RetrievalTask, passkey_task


def _doc(seed: int, n: int) -> str:
    return " ".join(f"w{(seed * 13 + 7 * i) % 100}" for i in range(n))


@pytest.fixture(scope="module")
def st_model(tmp_path_factory):
    return build_sentence_transformer(build_bert(), tmp_path_factory.mktemp("st"))


@pytest.fixture
def task():
    # 6 documents of 20 ... 250 words (a BERT trained at 64 positions); each query quotes its document's start
    corpus = {f"d{i}": _doc(i, 20 + 46 * i) for i in range(6)}
    queries = {f"q{i}": _doc(i, 6) for i in range(6)}
    return RetrievalTask("real", corpus, queries, {f"q{i}": {f"d{i}": 1.0} for i in range(6)})


def test_cut_counts_special_tokens_and_keeps_a_prefix(st_model):
    embedder = Embedder(st_model, show_progress=False)
    text = _doc(1, 100)
    assert embedder.specials == 2 and embedder.length(text) == 102
    for n in (2, 3, 40, 101):
        cut = embedder.cut(text, n)
        assert text.startswith(cut) and embedder.length(cut) == n
    assert embedder.cut(text, 102) == embedder.cut(text, 500) == text


def test_max_lengths_patch_each_method_to_n_and_share_what_is_unchanged(st_model, task):
    embedder = Embedder(st_model, batch_size=1, show_progress=False)
    lengths = [32, TRAINED, 128, 256]
    rows, _ = retrieval_grid(st_model, [task], ["truncate", "grouped", "pi"], max_lengths=lengths, embedder=embedder)
    cells = {(r["method"], r["length"]): r for r in rows}
    assert sorted(cells) == sorted((m, n) for m in ("truncate", "grouped", "pi") for n in lengths)
    for m in ("grouped", "pi"):  # nothing to extend within the trained length: the model as it is, marked so
        assert not cells[(m, 32)]["patched"] and not cells[(m, TRAINED)]["patched"]
        assert cells[(m, 128)]["patched"] and cells[(m, 128)]["params"]["target_length"] == 128
        assert cells[(m, 32)]["ndcg@10"] == cells[("truncate", 32)]["ndcg@10"]
    # truncate reads at most its own limit: past it, exactly what it read at N = L
    assert cells[("truncate", 256)]["ndcg@10"] == cells[("truncate", TRAINED)]["ndcg@10"]
    # what the model really encoded: queries (short) once for every method and length, documents within L once;
    # each patched (method, N) only the documents longer than L
    doc_tokens = [embedder.length(t) for t in task.corpus.values()]
    within = {embedder.cut(t, n) for t in task.corpus.values() for n in (32, TRAINED)}  # distinct texts
    longer = {n: sum(k > TRAINED for k in doc_tokens) for n in (128, 256)}  # documents past L, cut to N
    assert embedder.encoded["texts"] == len(task.queries) + len(within) + 2 * (longer[128] + longer[256])
    assert embedder.encoded["texts"] == 37  # a naive loop: 3 methods x 4 lengths x 12 texts = 144


def test_max_lengths_equal_a_patch_to_n_encoded_alone(st_model, task):
    """The shared embeddings change nothing: grouped at N=128 scores as if encoded from scratch under that patch."""
    import longctx

    rows, _ = retrieval_grid(st_model, [task], ["grouped"], max_lengths=[128], show_progress=False)
    with longctx.patched(st_model, "grouped", target_length=128):
        fresh = Embedder(st_model, batch_size=1, show_progress=False)
        cut = task.cut(128, fresh.cut)
        q = fresh.encode(list(cut.queries.values()))
        d = fresh.encode(list(cut.corpus.values()))
    from longctx.eval.metrics import score_queries

    scores = {qid: dict(zip(cut.corpus, row)) for qid, row in zip(cut.queries, (q @ d.T).tolist())}
    assert rows[0]["ndcg@10"] == pytest.approx(score_queries(scores, task.qrels, (1, 10))["ndcg@10"], abs=0)


def test_max_lengths_refuse_synthetic_tasks_and_bad_lengths(st_model, task):
    embedder = Embedder(st_model, show_progress=False)
    synthetic = passkey_task(embedder.count_tokens, [32], 2)
    with pytest.raises(ValueError, match="max_lengths cuts real tasks; \\['passkey'\\] are synthetic"):
        retrieval_grid(st_model, [synthetic], ["truncate"], max_lengths=[64], show_progress=False)
    with pytest.raises(ValueError, match="token counts >= 2"):
        retrieval_grid(st_model, [task], ["truncate"], max_lengths=[1], show_progress=False)


def test_progress_off_a_terminal_is_plain_lines_with_rate_and_time_left(capsys, monkeypatch):
    monkeypatch.setenv("LONGCTX_PROGRESS_SECONDS", "0")
    assert list(progress(range(4), "docs", unit="texts", terminal=False)) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.strip() for line in lines)  # no blank lines
    assert lines[0].startswith("docs: 1/4 texts (") and "texts/s" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("docs: 4 texts in ")


def test_curves_in_percent_with_numeric_length_ticks(tmp_path, monkeypatch):
    import longctx.eval.plots as plots

    seen = {}

    def keep(fig, path):
        seen["fig"] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    rows = [{"method": m, "length": n, "acc": v} for m in ("a", "b") for n, v in ((256, 0.0), (4096, 1.0))]
    plots.curves(rows, tmp_path / "x.png", metric="acc", title="t", trained_length=512, percent=True)
    ax = seen["fig"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["256", "4096"]
    assert ax.get_ylim() == (0, 102) and ax.get_ylabel() == "acc (%)"  # the data span 0-100 %: no tick below 0
    lines = [line for line in ax.get_lines() if not line.get_label().startswith("trained")]
    assert max(lines[1].get_ydata()) == 100.0 and lines[0].get_marker() != lines[1].get_marker()
    assert lines[0].get_xdata()[0] != lines[1].get_xdata()[0]  # nudged apart: equal values stay visible
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # outside the data
