"""Retrieval tasks: LongEmbed's synthetic passkey and needle tasks (generated locally, seeded) and real tasks read
from a local directory in LongEmbed's layout.

Synthetic construction, per document length n (in tokens of the evaluated model's tokenizer, special tokens
excluded, to within one filler unit):

- **passkey** (LongEmbed's personalised passkey retrieval): each candidate document is the repeated filler
  "The grass is green. The sky is blue. …" with one line "<Name>'s passkey is <key>. Remember it. <key> is the
  passkey for <Name>." at a depth; the query is "what is the passkey for <Name>?". Every document has its own
  person, so exactly one document answers each query.
- **needle**: the haystack is real prose (the bundled public-domain text, or any text given), one fact about a
  person ("<Name>'s favourite instrument is the cello.") is inserted at a depth, and the query asks for it
  ("What is <Name>'s favourite instrument?").

Documents of one length are the candidates for that length's queries (metric: nDCG@1 = top-1 accuracy).
Depths cycle over ``depths`` (default 0, 0.25, 0.5, 0.75, 1) so every depth has the same number of documents, or
are drawn uniformly per document with ``depths="random"`` (LongEmbed's placement); ``distractors`` adds candidate
documents that no query asks for (LongEmbed: 50 queries against 100 candidates per length).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = [
    "RetrievalTask",
    "passkey_task",
    "needle_task",
    "load_task",
    "default_haystack",
    "DEFAULT_DEPTHS",
    "RANDOM",
]

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
RANDOM = "random"  # depths drawn uniformly per document (LongEmbed's placement)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_FIRST = (
    "Olivia Liam Emma Noah Amelia Oliver Sophia Elijah Charlotte James Ava William Isabella Benjamin Mia Lucas "
    "Evelyn Henry Harper Theodore Luna Jack Camila Levi Gianna Alexander Elizabeth Jackson Eleanor Mateo Ella Daniel "
    "Abigail Michael Sofia Mason Avery Sebastian Scarlett Ethan Emily Logan Aria Owen Penelope Samuel Chloe Jacob "
    "Layla Asher Mila Aiden Nora John Hazel Joseph Madison Wyatt Ellie David Lily Leo Nova Luke Isla Julian Grace "
    "Hudson Violet Grayson Aurora Matthew Riley Ezra Zoey Gabriel Willow Carter Emilia Isaac Stella Jayden Zoe"
).split()
_LAST = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez Wilson "
    "Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark Ramirez Lewis Robinson "
    "Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green Adams Nelson Baker Hall Rivera Campbell "
    "Mitchell Carter Roberts Gomez Phillips Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales "
    "Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson"
).split()
_FACTS = {  # category -> values; the needle says "<Name>'s favourite <category> is <value>."
    "instrument": "the cello|the oboe|the banjo|the harp|the trumpet|the accordion|the sitar|the marimba".split("|"),
    "fruit": "the mango|the fig|the apricot|the lychee|the pomegranate|the quince|the kiwi|the plum".split("|"),
    "city": "Lisbon|Kyoto|Nairobi|Montreal|Tallinn|Valparaiso|Hanoi|Reykjavik".split("|"),
    "gemstone": "the opal|the garnet|the topaz|the jade|the onyx|the sapphire|the amethyst|the pearl".split("|"),
    "bird": "the heron|the kestrel|the puffin|the magpie|the toucan|the wren|the albatross|the ibis".split("|"),
    "board game": "chess|go|backgammon|checkers|mahjong|scrabble|carcassonne|othello".split("|"),
}


@dataclass
class RetrievalTask:
    """A retrieval task: ``corpus`` doc id → text, ``queries`` qid → text, ``qrels`` qid → {doc id: relevance};
    ``doc_meta``/``query_meta`` carry per-item facts such as ``length`` and ``depth`` (synthetic tasks)."""

    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, float]]
    doc_meta: dict[str, dict] = field(default_factory=dict)
    query_meta: dict[str, dict] = field(default_factory=dict)

    def split(self, length: int) -> RetrievalTask:
        """The sub-task of one synthetic length: its queries against the documents of that length."""
        docs = {d: t for d, t in self.corpus.items() if self.doc_meta.get(d, {}).get("length") == length}
        qids = [q for q in self.queries if self.query_meta.get(q, {}).get("length") == length]
        return RetrievalTask(
            f"{self.name}@{length}", docs, {q: self.queries[q] for q in qids}, {q: self.qrels[q] for q in qids},
            {d: self.doc_meta[d] for d in docs}, {q: self.query_meta[q] for q in qids},
        )

    def cut(self, length: int, cut: Callable[[str, int], str]) -> RetrievalTask:
        """The task with every document and query cut to ``length`` tokens by ``cut(text, length)`` (LongEmbed's
        protocol for real tasks; ``Embedder.cut`` counts special tokens in)."""
        return RetrievalTask(
            f"{self.name}@{length}", {d: cut(t, length) for d, t in self.corpus.items()},
            {q: cut(t, length) for q, t in self.queries.items()}, self.qrels, self.doc_meta, self.query_meta,
        )

    @property
    def lengths(self) -> list[int]:
        return sorted({m["length"] for m in self.doc_meta.values() if "length" in m})


def default_haystack() -> str:
    """The bundled public-domain haystack (Jane Austen, *Emma*, 1816; Project Gutenberg)."""
    return resources.files("longctx.data").joinpath("emma_austen_1816.txt").read_text()


def _people(rng: random.Random, n: int) -> list[str]:
    if n > len(_FIRST) * len(_LAST):
        raise ValueError(f"at most {len(_FIRST) * len(_LAST)} documents per length, got {n}")
    pairs = rng.sample(range(len(_FIRST) * len(_LAST)), n)
    return [f"{_FIRST[p % len(_FIRST)]} {_LAST[p // len(_FIRST)]}" for p in pairs]


def _fit_units(units: Sequence[str], budget: int, count: Callable[[str], int]) -> int:
    """The largest number of leading ``units`` whose space-joined text has at most ``budget`` tokens."""
    lo, hi = 0, len(units)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(units[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _insert(units: list[str], line: str, depth: float) -> str:
    at = round(depth * len(units))
    return " ".join(units[:at] + [line] + units[at:])


def _add(task: RetrievalTask, n: int, i: int, text: str, query: str | None, depth: float, meta: dict) -> None:
    """Record document ``i`` of length ``n`` and its query (the one document relevant to it); a distractor
    (``query=None``) is a candidate that no query asks for."""
    doc, qid = f"{task.name}-{n}-doc{i}", f"{task.name}-{n}-q{i}"
    task.corpus[doc] = text
    task.doc_meta[doc] = {"length": n, "depth": depth, **meta}
    if query is not None:
        task.queries[qid] = query
        task.qrels[qid] = {doc: 1.0}
        task.query_meta[qid] = {"length": n, "depth": depth}


def _check(lengths: Sequence[int], n_docs: int, depths: Sequence[float] | str, distractors: int) -> None:
    if not lengths or any(n < 16 for n in lengths):
        raise ValueError(f"lengths must be token counts >= 16, got {list(lengths)}")
    if n_docs + distractors < 2 or n_docs < 1:
        raise ValueError(f"need at least 2 documents per length (candidates), got {n_docs} + {distractors} distractors")
    if distractors < 0:
        raise ValueError(f"distractors must be >= 0, got {distractors}")
    if depths == RANDOM:
        return
    if isinstance(depths, str) or not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be values in [0, 1] or {RANDOM!r}, got {depths!r}")


def _depth(depths: Sequence[float] | str, i: int, rng: random.Random) -> float:
    return rng.random() if depths == RANDOM else float(depths[i % len(depths)])


def passkey_task(
    count: Callable[[str], int],
    lengths: Sequence[int],
    n_docs: int = 50,
    *,
    depths: Sequence[float] | str = DEFAULT_DEPTHS,
    seed: int = 0,
    digits: int = 5,
    distractors: int = 0,
) -> RetrievalTask:
    """LongEmbed's personalised passkey retrieval. ``count(text)`` = tokens of ``text`` for the evaluated model
    (special tokens excluded); documents are built to at most ``length`` tokens, within one filler unit.
    ``n_docs`` documents have a query each; ``distractors`` more are candidates no query asks for (LongEmbed: 50
    queries, 100 candidates); ``depths="random"`` draws each document's depth uniformly (seeded)."""
    _check(lengths, n_docs, depths, distractors)
    task = RetrievalTask("passkey", {}, {}, {})
    unit_tokens = max(1, count(" ".join([PASSKEY_FILLER] * 8)) // 8)
    for n in lengths:
        rng = random.Random(f"{seed}-passkey-{n}")
        for i, name in enumerate(_people(rng, n_docs + distractors)):
            key = str(rng.randrange(10 ** (digits - 1), 10**digits))
            line = f"{name}'s passkey is {key}. Remember it. {key} is the passkey for {name}."
            budget = max(0, n - count(line))
            units = [PASSKEY_FILLER] * (budget // unit_tokens + 2)
            units = units[: _fit_units(units, budget, count)]
            depth = _depth(depths, i, rng)
            query = f"what is the passkey for {name}?" if i < n_docs else None
            _add(task, n, i, _insert(units, line, depth), query, depth, {"key": key, "name": name})
    return task


def needle_task(
    count: Callable[[str], int],
    lengths: Sequence[int],
    n_docs: int = 50,
    *,
    depths: Sequence[float] | str = DEFAULT_DEPTHS,
    seed: int = 0,
    haystack: str | None = None,
    distractors: int = 0,
) -> RetrievalTask:
    """Needle retrieval: one fact about a person inserted into real prose at a depth; the query asks for it.
    Each document takes its haystack from its own seeded offset in ``haystack`` (default: the bundled text);
    ``distractors`` and ``depths`` as for :func:`passkey_task`."""
    _check(lengths, n_docs, depths, distractors)
    words = (haystack if haystack is not None else default_haystack()).split()
    task = RetrievalTask("needle", {}, {}, {})
    categories = sorted(_FACTS)
    for n in lengths:
        rng = random.Random(f"{seed}-needle-{n}")
        for i, name in enumerate(_people(rng, n_docs + distractors)):
            category = categories[i % len(categories)]
            value = rng.choice(_FACTS[category])
            line = f"{name}'s favourite {category} is {value}."
            budget = max(0, n - count(line))
            span = min(len(words), int(budget * 1.5) + 64)  # more words than the budget can take
            start = rng.randrange(len(words) - span) if len(words) > span else 0
            units = words[start : start + span]
            fitted = _fit_units(units, budget, count)
            if fitted == len(units) and count(" ".join(units)) < budget * 0.9:
                raise ValueError(f"the haystack has too few words ({len(words)}) for {n}-token documents")
            units = units[:fitted]
            depth = _depth(depths, i, rng)
            query = f"What is {name}'s favourite {category}?" if i < n_docs else None
            _add(task, n, i, _insert(units, line, depth), query, depth, {"name": name, "fact": line})
    return task


_EXPECTED = {
    "corpus.jsonl": ("doc_id", "text"),
    "queries.jsonl": ("qid", "text"),
    "qrels.jsonl": ("qid", "doc_id"),
}


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            missing = [k for k in fields if k not in row]
            if not isinstance(row, dict) or missing:
                raise ValueError(f"{path}:{lineno}: each line needs the fields {list(fields)}; missing {missing}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def _unique(path: Path, key: str) -> dict[str, str]:
    """``{id: text}`` of a corpus or queries file; an id given twice is an error naming both lines (it would silently
    replace the first text)."""
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    for lineno, row in enumerate(_read_jsonl(path, _EXPECTED[path.name]), 1):
        ident = str(row[key])
        if ident in out:
            raise ValueError(f"{path}: {key} {ident!r} appears twice (entries {seen[ident]} and {lineno}); "
                             f"each {key} names one text")
        out[ident], seen[ident] = str(row["text"]), lineno
    return out


def load_task(directory: str | Path) -> RetrievalTask:
    """A real retrieval task in LongEmbed's layout: ``corpus.jsonl`` (``doc_id``, ``text``), ``queries.jsonl``
    (``qid``, ``text``), ``qrels.jsonl`` (``qid``, ``doc_id``, optional ``relevance``/``score``, default 1)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no task directory {directory}: it must hold {', '.join(_EXPECTED)}")
    absent = [f for f in _EXPECTED if not (directory / f).is_file()]
    if absent:
        raise FileNotFoundError(
            f"{directory} lacks {', '.join(absent)}; a task directory holds "
            + "; ".join(f"{f} ({', '.join(k)})" for f, k in _EXPECTED.items())
        )
    corpus = _unique(directory / "corpus.jsonl", "doc_id")
    queries = _unique(directory / "queries.jsonl", "qid")
    qrels: dict[str, dict[str, float]] = {}
    for r in _read_jsonl(directory / "qrels.jsonl", _EXPECTED["qrels.jsonl"]):
        qid, doc = str(r["qid"]), str(r["doc_id"])
        if qid not in queries or doc not in corpus:
            raise ValueError(f"{directory / 'qrels.jsonl'}: ({qid}, {doc}) names a query or document that does not exist")
        qrels.setdefault(qid, {})[doc] = float(r.get("relevance", r.get("score", 1.0)))
    return RetrievalTask(directory.name, corpus, {q: queries[q] for q in qrels}, qrels)
