"""LongEmbed-style synthetic tasks (deterministic, key at the requested depth, lengths kept) and the real-task
reader (clear errors naming the expected files)."""

from __future__ import annotations

import json

import pytest

from longctx.eval.synthetic import PASSKEY_FILLER, load_task, needle_task, passkey_task


def count(text: str) -> int:  # a whitespace tokenizer: lengths are checkable by hand
    return len(text.split())


@pytest.mark.parametrize("build", [passkey_task, needle_task])
def test_deterministic_for_a_seed(build):
    a, b, c = build(count, [64, 128], 6, seed=1), build(count, [64, 128], 6, seed=1), build(count, [64, 128], 6, seed=2)
    assert a.corpus == b.corpus and a.queries == b.queries and a.qrels == b.qrels
    assert a.corpus != c.corpus


@pytest.mark.parametrize("build", [passkey_task, needle_task])
def test_key_at_the_requested_depth_and_length_kept(build):
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    task = build(count, [100, 400], 10, depths=depths, seed=3)
    assert task.lengths == [100, 400]
    filler_words = len(PASSKEY_FILLER.split())
    for doc, text in task.corpus.items():
        meta = task.doc_meta[doc]
        assert meta["depth"] in depths
        n = meta["length"]
        assert n - filler_words - 2 <= count(text) <= n  # within one filler unit of the requested length
        line = f"{meta['name']}'s passkey is {meta['key']}. Remember it. {meta['key']} is the passkey for {meta['name']}." \
            if task.name == "passkey" else meta["fact"]
        before, after = text.split(line)
        at, rest = len(before.split()), len(after.split())
        unit = filler_words if task.name == "passkey" else 1  # the line goes between filler units / haystack words
        assert abs(at - meta["depth"] * (at + rest)) <= unit / 2 + 1e-9
    # one relevant document per query, the one holding its person's line
    for qid, rel in task.qrels.items():
        (doc,) = rel
        assert task.doc_meta[doc]["name"] in task.queries[qid]
    split = task.split(100)
    assert len(split.corpus) == len(split.queries) == 10


def test_depth_extremes_put_the_line_first_and_last():
    task = passkey_task(count, [120], 2, depths=(0.0, 1.0), seed=0)
    first, last = (task.corpus[f"passkey-120-doc{i}"] for i in range(2))
    assert first.startswith(task.doc_meta["passkey-120-doc0"]["name"])
    assert last.endswith(f"the passkey for {task.doc_meta['passkey-120-doc1']['name']}.")


def test_bad_synthetic_arguments():
    with pytest.raises(ValueError, match="at least 2 documents"):
        passkey_task(count, [64], 1)
    with pytest.raises(ValueError, match="depths"):
        needle_task(count, [64], 4, depths=(1.5,))
    with pytest.raises(ValueError, match="too few words"):
        needle_task(count, [5000], 2, haystack="only a few words here")


def _write(tmp_path, corpus, queries, qrels):
    for name, rows in (("corpus.jsonl", corpus), ("queries.jsonl", queries), ("qrels.jsonl", qrels)):
        if rows is not None:
            (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_load_task_reads_longembed_layout(tmp_path):
    _write(tmp_path, [{"doc_id": "d1", "text": "alpha"}, {"doc_id": "d2", "text": "beta"}],
           [{"qid": "q1", "text": "a?"}], [{"qid": "q1", "doc_id": "d2", "relevance": 2}])
    task = load_task(tmp_path)
    assert task.corpus == {"d1": "alpha", "d2": "beta"} and task.qrels == {"q1": {"d2": 2.0}}
    assert task.lengths == []


def test_load_task_errors_name_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus.jsonl"):
        load_task(tmp_path / "absent")
    _write(tmp_path, [{"doc_id": "d1", "text": "x"}], [{"qid": "q1", "text": "y"}], None)
    with pytest.raises(FileNotFoundError, match="lacks qrels.jsonl"):
        load_task(tmp_path)
    _write(tmp_path, [{"doc_id": "d1"}], [{"qid": "q1", "text": "y"}], [{"qid": "q1", "doc_id": "d1"}])
    with pytest.raises(ValueError, match=r"corpus.jsonl:1: .*missing \['text'\]"):
        load_task(tmp_path)
    (tmp_path / "corpus.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        load_task(tmp_path)
    _write(tmp_path, [{"doc_id": "d1", "text": "x"}], [{"qid": "q1", "text": "y"}], [{"qid": "q1", "doc_id": "zz"}])
    with pytest.raises(ValueError, match="does not exist"):
        load_task(tmp_path)
    _write(tmp_path, [{"doc_id": "d1", "text": "x"}, {"doc_id": 1, "text": "z"}, {"doc_id": "1", "text": "w"}],
           [{"qid": "q1", "text": "y"}], [{"qid": "q1", "doc_id": "d1"}])
    with pytest.raises(ValueError, match=r"doc_id '1' appears twice \(entries 2 and 3\)"):
        load_task(tmp_path)


def test_distractors_and_random_depths():
    """LongEmbed's shape: queries for some documents, more candidates than queries, depths drawn per document."""
    from longctx.eval.synthetic import RANDOM, passkey_task

    count = lambda text: len(text.split())  # noqa: E731  (a word-count "tokenizer")
    task = passkey_task(count, [200], 4, depths=RANDOM, distractors=6, seed=3)
    assert len(task.corpus) == 10 and len(task.queries) == 4
    split = task.split(200)
    assert len(split.corpus) == 10  # the distractors are candidates of the length's queries
    depths = [m["depth"] for m in task.doc_meta.values()]
    assert len(set(depths)) == 10 and all(0.0 <= d <= 1.0 for d in depths)
    assert passkey_task(count, [200], 4, depths=RANDOM, distractors=6, seed=3).corpus == task.corpus
    queried = {doc for rel in task.qrels.values() for doc in rel}
    assert queried == {f"passkey-200-doc{i}" for i in range(4)}  # the distractors answer no query
    with pytest.raises(ValueError, match="depths"):
        passkey_task(count, [200], 4, depths="sometimes")
    with pytest.raises(ValueError, match="distractors"):
        passkey_task(count, [200], 4, distractors=-1)
