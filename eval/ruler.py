"""RULER's synthetic tasks for decoders (NVIDIA, "RULER: What's the Real Context Size of Your Long-Context Language
Models?"), generated and scored as its scripts do.

Read from ``NVIDIA/RULER`` (main of 2026-07, c3f5e3b): ``scripts/data/synthetic/constants.py`` (templates, answer
prefixes, tokens to generate — reproduced below as data), ``scripts/synthetic.yaml`` (the task settings),
``niah.py``, ``variable_tracking.py``, ``common_words_extraction.py``, ``freq_words_extraction.py`` (the generation
rules) and ``scripts/eval/synthetic/constants.py`` / ``evaluate.py`` (scoring). Written anew here, with these
differences, all forced by working offline or per sample:

* **Essay haystack**: RULER's is Paul Graham's essays (downloaded); here it is the bundled public-domain text
  (Austen's *Emma*, the same default as ``longctx eval needle``) or any text given; sentences are split at
  ``.``, ``!`` or ``?`` followed by white space (RULER uses NLTK's ``sent_tokenize``, whose model is a download).
* **Randomness per sample**: every sample draws from its own ``random.Random(seed)`` (RULER seeds the global
  generator once per file), so a sample does not depend on which others run — a run can be resumed or split. The
  rules (what is drawn, from which sets, how it is placed) are RULER's; the draws are not the same numbers.
* **Words**: wonderwords' lists, as RULER loads them (its private ``_get_words_from_text_file``); RULER's fallback
  word list for very long CWE inputs (``english_words.json``) is not shipped: CWE asks for more distinct words than
  wonderwords has only past about 64k tokens, and says so.
* **QA tasks** (SQuAD, HotpotQA) need their datasets: not offline, not included.

Lengths are in the evaluated model's tokens (special tokens excluded, as RULER's ``text_to_tokens``): the input
with its answer prefix plus the tokens to generate fit in the length, the haystack sized by RULER's binary search.
The prompt is the input followed by the answer prefix (RULER's ``base`` model template); greedy generation.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

__all__ = ["TEMPLATES", "TASKS", "RulerSample", "ruler_sample", "score", "string_match_all", "string_match_part",
           "postprocess_pred", "EFFECTIVE_THRESHOLD", "effective_length", "run_samples"]

# scripts/data/synthetic/constants.py: template, answer prefix, tokens to generate
TEMPLATES: dict[str, dict[str, Any]] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                    "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                    "magic {type_needle_v} for {query} mentioned in the provided text?",
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
                    "Question: Find all variables that are assigned the value {query} in the text above.",
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                         "are assigned the value {query}, they are: ",
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                    "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                    "above list?",
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most "
                    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                    "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                    "text?",
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
}

def _niah(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> tuple[str, dict[str, Any]]:
    return "niah", dict(type_haystack=haystack, type_needle_k=key, type_needle_v=value, num_needle_k=k,
                        num_needle_v=v, num_needle_q=q)


# scripts/synthetic.yaml
TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": ("variable_tracking", dict(type_haystack="noise", num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(i * 100 / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)).astype(int)
EFFECTIVE_THRESHOLD = 85.6  # RULER: Llama-2-7B's average at 4k, the bar a length must clear to count


# --- scoring (scripts/eval/synthetic/constants.py, evaluate.py) --------------------------------------------------
def postprocess_pred(text: str) -> str:
    """RULER's prediction clean-up: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """Per prediction, the share of references it contains (case-insensitive); the mean × 100, rounded to 2."""
    score = sum(sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref)
                for p, ref in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    """Per prediction, 1 if it contains any reference (case-insensitive); the mean × 100, rounded to 2."""
    score = sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref) for p, ref in zip(preds, refs)) / len(
        preds) * 100
    return round(score, 2)


METRICS: dict[str, Callable[[list[str], list[list[str]]], float]] = {
    "niah": string_match_all, "variable_tracking": string_match_all, "common_words_extraction": string_match_all,
    "freq_words_extraction": string_match_all,
}


def score(task: str, prediction: str, outputs: list[str]) -> float:
    """One sample's score (0 … 100) by its task's RULER metric, after RULER's clean-up of the prediction."""
    return METRICS[TASKS[task][0]]([postprocess_pred(prediction)], [list(outputs)])


def effective_length(averages: dict[int, float], threshold: float = EFFECTIVE_THRESHOLD) -> int | None:
    """RULER's effective length: the longest length such that it and every shorter length score ≥ ``threshold``
    (None when the shortest does not)."""
    best = None
    for length in sorted(averages):
        if averages[length] < threshold:
            break
        best = length
    return best


# --- generation ---------------------------------------------------------------------------------------------------
@dataclass
class RulerSample:
    """One RULER input: ``input`` (without the answer prefix), ``answer_prefix``, the references ``outputs``,
    ``length`` (its tokens with the prefix plus the tokens to generate), as RULER's jsonl rows."""

    task: str
    max_length: int
    seed: int
    input: str
    answer_prefix: str
    outputs: list[str]
    length: int
    tokens_to_generate: int

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=1)
def _wonderwords() -> tuple[list[str], list[str], list[str]]:
    try:
        from wonderwords import random_word
    except ImportError:
        raise ImportError("RULER's word lists come from wonderwords: pip install wonderwords") from None
    load = random_word._get_words_from_text_file  # as RULER loads them
    return load("nounlist.txt"), load("adjectivelist.txt"), load("verblist.txt")


@lru_cache(maxsize=1)
def _key_parts() -> tuple[list[str], list[str]]:
    nouns, adjs, _ = _wonderwords()
    return sorted(set(adjs)), sorted(set(nouns))


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _essay_words(haystack: str) -> list[str]:
    return re.sub(r"\s+", " ", haystack).strip().split(" ")


def _zeta(alpha: float) -> float:
    if alpha == 2.0:
        return math.pi ** 2 / 6
    n = 100_000
    return sum(k ** -alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha


class _Gen:
    """One sample's generator: the task's rules, drawing from ``random.Random(seed)``."""

    def __init__(self, task: str, seed: int, haystack: str | None) -> None:
        self.kind, self.args = TASKS[task]
        self.seed, self.haystack = seed, haystack
        self.base = zlib.crc32(task.encode()) * 1_000_003 + seed  # each task draws its own keys for a seed

    def rng(self, salt: int = 0) -> random.Random:
        return random.Random(self.base * 16 + salt)

    # NIAH ------------------------------------------------------------------------------------------------------
    def _random(self, rng: random.Random, kind: str) -> str:
        if kind == "numbers":
            return str(rng.randint(10 ** 6, 10 ** 7 - 1))
        if kind == "words":  # uniform over RULER's adjective-noun pairs (drawn as a pair, not from a 6M-long list)
            adjs, nouns = _key_parts()
            return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise ValueError(kind)

    def niah(self, num_haystack: int, rng: random.Random) -> tuple[str, list[str]]:
        a = self.args
        num_k = max(a["num_needle_k"], a["num_needle_q"])
        keys, values, needles = [], [], []
        for _ in range(num_k):
            keys.append(self._random(rng, a["type_needle_k"]))
            value = []
            for _ in range(a["num_needle_v"]):
                value.append(self._random(rng, a["type_needle_v"]))
                needles.append(NEEDLE.format(type_needle_v=a["type_needle_v"], key=keys[-1], value=value[-1]))
            values.append(value)
        random.Random(self.seed).shuffle(needles)
        if a["type_haystack"] == "essay":
            words = _essay_words(self.haystack)
            repeats = -(-num_haystack // len(words))
            sents = _sentences(" ".join((words * repeats)[:num_haystack]))
            cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if a["type_haystack"] == "noise":
                lines = [NOISE] * num_haystack
            else:
                lines = [NEEDLE.format(type_needle_v=a["type_needle_v"], key=self._random(rng, a["type_needle_k"]),
                                       value=self._random(rng, a["type_needle_v"])) for _ in range(num_haystack)]
            for index, needle in zip(sorted(rng.sample(range(num_haystack), len(needles)), reverse=True), needles):
                lines.insert(index, needle)
            context = "\n".join(lines)
        picked = rng.sample(range(num_k), a["num_needle_q"])
        queries = [keys[i] for i in picked]
        answers = [v for i in picked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template = TEMPLATES["niah"]["template"] + TEMPLATES["niah"]["answer_prefix"]
        type_v = a["type_needle_v"]
        if a["num_needle_q"] * a["num_needle_v"] == 1:
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                template = template.replace(old, new)
            type_v = type_v[:-1]
        return template.format(type_needle_v=type_v, context=context, query=query), answers

    # variable tracking -------------------------------------------------------------------------------------------
    def _chains(self, rng: random.Random, is_icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        chains_n, hops = self.args["num_chains"], self.args["num_hops"]
        k = 3 if is_icl else 5
        hops = min(10, hops) if is_icl else hops
        names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range((hops + 1) * chains_n)]
        while len(set(names)) < chains_n * (hops + 1):
            names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
        all_vars, chains = [], []
        for i in range(0, len(names), hops + 1):
            these = names[i:i + hops + 1]
            all_vars.append(these)
            first = "12345" if is_icl else str(rng.randint(10000, 99998))  # np.random.randint(10000, 99999)
            chain = [f"VAR {these[0]} = {first}"] + [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(hops)]
            chains.append(chain)
        return all_vars, chains

    def vt(self, num_noises: int, rng: random.Random, is_icl: bool = False) -> tuple[str, list[str]]:
        names, chains = self._chains(rng, is_icl)
        value = chains[0][0].split("=")[-1].strip()
        lines = [NOISE] * num_noises
        for chain in chains:
            positions = sorted(rng.sample(range(len(lines)), len(chain)))
            for at, j in zip(positions, range(len(chain))):
                lines.insert(at + j, chain[j])
        context = "\n".join(lines).replace(". \n", ".\n")
        template = TEMPLATES["variable_tracking"]["template"] + TEMPLATES["variable_tracking"]["answer_prefix"]
        return template.format(context=context, query=value, num_v=self.args["num_hops"] + 1), names[0]

    def vt_icl(self, count: Callable[[str], int]) -> str:
        """RULER's one in-context example: a variable-tracking input of at most 500 tokens (3-letter names, value
        12345) with its answer, names and value then re-drawn (``randomize_icl``)."""
        rng = self.rng(1)
        n = _fit(lambda m: self.vt(m, random.Random(self.seed * 7 + 1), is_icl=True)[0], count, 500, 5)
        text, answer = self.vt(n, random.Random(self.seed * 7 + 1), is_icl=True)
        example = text + " " + " ".join(answer) + "\n"
        for item in example.strip().split()[-self.args["num_hops"] - 1:]:
            example = example.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
        return example.replace("12345", str(rng.randint(10000, 99998)))

    # common words -----------------------------------------------------------------------------------------------
    @staticmethod
    @lru_cache(maxsize=8)
    def _cwe_words(seed: int) -> list[str]:
        nouns, adjs, verbs = _wonderwords()
        words = sorted(set(nouns + adjs + verbs))
        random.Random(seed).shuffle(words)
        return words

    def _cwe_example(self, rng: random.Random, num_words: int, common: int, uncommon: int) -> tuple[str, list[str]]:
        words = self._cwe_words(self.seed)
        if num_words > len(words):
            raise ValueError(f"CWE needs {num_words} distinct words, wonderwords has {len(words)} (RULER's fallback "
                             "list english_words.json is not included): use a shorter length")
        full = rng.sample(words, num_words)
        top, rest = full[:self.args["num_cw"]], full[self.args["num_cw"]:]
        listed = top * common + rest * uncommon
        random.Random(self.seed).shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), top

    def cwe(self, num_words: int, rng: random.Random, max_length: int) -> tuple[str, list[str]]:
        template = (TEMPLATES["common_words_extraction"]["template"]
                    + TEMPLATES["common_words_extraction"]["answer_prefix"])
        if max_length < 4096:
            shot = self._cwe_example(rng, 20, 3, 1)
            context, answer = self._cwe_example(rng, num_words, 6, 1)
        else:
            shot = self._cwe_example(rng, 40, 10, 3)
            context, answer = self._cwe_example(rng, num_words, self.args["freq_cw"], self.args["freq_ucw"])
        shot_text = template.format(context=shot[0], query="") + " " + " ".join(
            f"{i + 1}. {w}" for i, w in enumerate(shot[1]))
        return shot_text + "\n" + template.format(context=context, query=""), answer

    # frequent words ---------------------------------------------------------------------------------------------
    def fwe(self, num_words: int, vocab_size: int) -> tuple[str, list[str]]:
        rng = self.rng(2)
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(vocab_size)]
        while len(set(vocab)) < vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=6)))
        vocab = sorted(set(vocab))
        random.Random(self.seed).shuffle(vocab)
        vocab[0] = "..."  # the top ranked is noise
        alpha, z = self.args["alpha"], _zeta(self.args["alpha"])
        words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(num_words * k ** -alpha / z))]
        random.Random(self.seed).shuffle(words)
        template = TEMPLATES["freq_words_extraction"]["template"] + TEMPLATES["freq_words_extraction"]["answer_prefix"]
        return template.format(context=" ".join(words), query=""), vocab[1:4]


def _fit(make: Callable[[int], str], count: Callable[[str], int], budget: int, incremental: int,
         cap: int | None = None, probe: int | None = None, slack: int = 3) -> int:
    """RULER's binary search: the largest haystack size whose input fits ``budget`` tokens (at least ``incremental``,
    at most ``cap``: CWE's word list, where RULER stops too). The upper bound is ``slack`` × the size that an input of
    ``probe`` units (default ``incremental``) estimates, as RULER's generators take it (NIAH and VT: 3× from one
    step; CWE: 2× from 4096 words, whose worked example would make one step's estimate far too high). Should an
    input of the bound still fit, the bound doubles until one overflows (RULER would return the bound: an input
    cut short)."""
    probe = probe or incremental
    per = count(make(probe)) / probe
    low, high = incremental, max(int(budget / per * slack), incremental * 2)
    if cap is not None:
        high = min(high, cap)
    while count(make(high)) <= budget:
        if cap is not None and high >= cap:
            return cap
        low, high = high, high * 2 if cap is None else min(high * 2, cap)
    best = low if low > incremental else None
    while low <= high:
        mid = (low + high) // 2
        if count(make(mid)) <= budget:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best if best is not None else incremental


def ruler_sample(task: str, max_length: int, tokenizer: Any, seed: int = 0, haystack: str | None = None
                 ) -> RulerSample:
    """One RULER input of ``task`` that fits ``max_length`` tokens of ``tokenizer`` with its answer prefix and the
    task's tokens to generate. ``haystack``: the essay text (default: the bundled novel)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; the tasks: {', '.join(TASKS)}")
    kind, args = TASKS[task]
    if kind == "niah" and args["type_haystack"] == "essay" and haystack is None:
        from .synthetic import default_haystack

        haystack = default_haystack()
    gen = _Gen(task, seed, haystack)
    spec = TEMPLATES[kind]
    to_generate = spec["tokens_to_generate"]

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

    budget = max_length - to_generate
    cap, probe, slack = None, None, 3  # the largest size there is (CWE: its word list); _fit's estimate
    if kind == "niah":
        incremental = 500 if args["type_haystack"] == "essay" else (25 if max_length >= 4096 else 5)

        def make(n: int) -> str:
            return gen.niah(n, gen.rng())[0]
    elif kind == "variable_tracking":
        icl = gen.vt_icl(count)
        budget -= count(icl)
        incremental = 10 if max_length >= 4096 else 5

        def make(n: int) -> str:
            return gen.vt(n, gen.rng())[0]
    elif kind == "common_words_extraction":
        incremental, cap = 10, len(gen._cwe_words(gen.seed))
        probe, slack = min(4096, cap), 2

        def make(n: int) -> str:
            return gen.cwe(n, gen.rng(), max_length)[0]
    else:
        vocab_size = budget // 50
        incremental = max(1, budget // 32)

        def make(n: int) -> str:
            return gen.fwe(n, vocab_size)[0]
    if kind == "freq_words_extraction":  # RULER grows the word count until it overflows, then steps back once
        n = budget // 6
        while count(make(n)) < budget:
            n += incremental
        n -= incremental
        while n > incremental and count(make(n)) > budget:
            n -= incremental
    else:
        n = _fit(make, count, budget, incremental, cap, probe, slack)
        while n > incremental and count(make(n)) > budget:  # RULER steps back while a sample overflows
            n -= incremental

    def build(n: int) -> tuple[str, list[str]]:
        if kind == "niah":
            return gen.niah(n, gen.rng())
        if kind == "variable_tracking":
            text, outputs = gen.vt(n, gen.rng())
            cut = text.index(TEMPLATES["variable_tracking"]["template"][:20])
            return text[:cut] + icl + "\n" + text[cut:], outputs
        if kind == "common_words_extraction":
            return gen.cwe(n, gen.rng(), max_length)
        return gen.fwe(n, vocab_size)

    text, outputs = build(n)
    length = count(text) + to_generate
    while length > max_length and n > incremental:  # RULER steps back while the final sample overflows
        n -= incremental
        text, outputs = build(n)
        length = count(text) + to_generate
    if length > max_length:
        raise ValueError(f"{task}: no input fits {max_length} tokens (the smallest is {length})")
    at = text.rfind(spec["answer_prefix"][:10])
    return RulerSample(task=task, max_length=max_length, seed=seed, input=text[:at], answer_prefix=text[at:],
                       outputs=list(outputs), length=length, tokens_to_generate=to_generate)


# --- running: methods × lengths × tasks × samples -----------------------------------------------------------------
def sample_seed(seed: int, length: int, index: int) -> int:
    """The seed of sample ``index`` at ``length``: ``seed + 1000·length + index`` (a sample does not depend on which
    others run, so a grid can be resumed, split or extended with more samples)."""
    return seed + 1000 * length + index


def run_samples(model: Any, tokenizer: Any, samples: list[RulerSample]) -> list[float]:
    """Each sample generated greedily (one at a time) and scored by its task's RULER metric (0–100)."""
    from .passkey import greedy

    return [score(s.task, greedy(model, tokenizer, [s.prompt], s.tokens_to_generate)[0][0], s.outputs)
            for s in samples]


def ruler_grid(
    model: Any,
    tokenizer: Any,
    methods: list[str],
    lengths: list[int],
    tasks: list[str] | None = None,
    *,
    samples: int = 1,
    seed: int = 0,
    target_length: int | None = None,
    method_params: dict[str, dict] | None = None,
    haystack: str | None = None,
    batch_size: int = 1,
    log: Any = None,
    progress: bool = True,
) -> list[dict]:
    """Every RULER sample of ``tasks`` (default: all of :data:`TASKS`) × ``lengths`` × ``samples`` for each method
    (``"vanilla"``: the model as it is), each method patched once to ``target_length`` (default: the longest
    length). Rows: ``{"task": "ruler", "subtask", "method", "length", "index", "seed", "score", "pred",
    "outputs", "tokens", "params"}``; rows already in ``log`` (a resumed run) are kept and not run again; new rows are
    appended to it as each finishes. Samples of one (task, length) run ``batch_size`` at a time."""
    from .passkey import greedy
    from .progress import progress as show
    from .runner import Cell, sweep

    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; the tasks: {', '.join(TASKS)}")
    if samples < 1 or batch_size < 1:
        raise ValueError("samples and batch_size must be at least 1")
    import longctx

    trained = longctx.inspect(model).trained_length
    target = target_length or max(max(lengths), trained + 1)
    # every input first (the same for every method): a length a task cannot fit fails before any generation
    built = {(t, n, i): ruler_sample(t, n, tokenizer, sample_seed(seed, n, i), haystack)
             for n in lengths for t in tasks for i in range(samples)}

    def inputs(task: str, length: int, index: int) -> RulerSample:
        return built[(task, length, index)]

    def run(cell: Cell):
        done = {(r["subtask"], r["length"], r["seed"]) for r in cell.previous}
        todo = [(t, i) for t in tasks for i in range(samples)
                if (t, cell.length, sample_seed(seed, cell.length, i)) not in done]
        # batches never mix tasks (one task: one number of tokens to generate)
        groups = [g for k in dict.fromkeys(t for t, _ in todo) for g in _split([x for x in todo if x[0] == k],
                                                                               batch_size)]
        for group in show(groups, desc=f"ruler {cell.method}@{cell.length}", enabled=progress,
                          unit="batch" if batch_size > 1 else "sample"):
            items = [inputs(t, cell.length, i) for t, i in group]
            preds = [text for text, _ in greedy(model, tokenizer, [s.prompt for s in items],
                                                items[0].tokens_to_generate)]
            for (t, i), s, pred in zip(group, items, preds):
                yield {"task": "ruler", "subtask": t, "index": i, "seed": s.seed, "score": score(t, pred, s.outputs),
                       "pred": pred, "outputs": s.outputs, "tokens": s.length}

    return sweep(model, methods, lengths, run, target=target, method_params=method_params, log=log,
                 match={"task": "ruler"})


def _split(items: list, size: int) -> list[list]:
    return [items[j:j + size] for j in range(0, len(items), size)]


def ruler_summary(rows: list[dict]) -> list[dict]:
    """Per method (and parameter set) × length: each task's mean score, the average over the tasks present, the
    samples, and the method's effective length (RULER's threshold, :data:`EFFECTIVE_THRESHOLD`)."""
    variants = list(dict.fromkeys((r["method"], r.get("params")) for r in rows))
    out = []
    for method, params in variants:
        mine = [r for r in rows if r["method"] == method and r.get("params") == params]
        averages = {}
        for n in sorted({r["length"] for r in mine}):
            cell = [r for r in mine if r["length"] == n]
            per_task = {t: sum(r["score"] for r in cell if r["subtask"] == t) / sum(1 for r in cell if r["subtask"] == t)
                        for t in dict.fromkeys(r["subtask"] for r in cell)}
            averages[n] = sum(per_task.values()) / len(per_task)
            out.append({"method": method, "params": params, "length": n, "tasks": per_task, "average": averages[n],
                        "samples": len(cell)})
        effective = effective_length(averages)
        for row in out:
            if row["method"] == method and row["params"] == params:
                row["effective_length"] = effective
    return out
