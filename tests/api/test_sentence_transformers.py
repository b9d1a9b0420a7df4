"""A RoPE encoder wrapped by sentence-transformers is patched through its inner transformers model."""

from __future__ import annotations

import torch
from conftest import build

import longctx


def test_sentence_transformer_modernbert(tmp_path):
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i + 4 for i in range(100)}}
    backend = Tokenizer(tok_models.WordLevel(vocab, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                  cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    build("modernbert").save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    transformer = models.Transformer(str(tmp_path), max_seq_length=64)
    st = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_embedding_dimension())])
    text = " ".join(f"w{i % 100}" for i in range(200))
    short = st.encode([text])  # truncated at 64 tokens
    info = longctx.patch(st, "yarn", target_length=256)
    assert info.layer_types == ["full_attention"]
    assert st.max_seq_length == 256
    long = st.encode([text])  # now reads all 200 tokens
    assert not torch.allclose(torch.tensor(short), torch.tensor(long))
    longctx.unpatch(st)
    assert st.max_seq_length == 64
    assert torch.allclose(torch.tensor(st.encode([text])), torch.tensor(short))
