"""V2PE: the official position ids, exactness at 300k tokens, tiny Llava / InternVL / Gemma3 from configs (delta = 1 is
the unpatched model; delta = 1/4, 1/16 prefill + generate; left-padded batches equal single rows), auto, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import IMAGE, SHARED, VLM_TEXT, build, build_vlm
from safetensors.torch import load_file

import longctx
from longctx.core.positions import v2pe_auto_delta, v2pe_position_ids

FIXTURE = SHARED / "fixtures" / "v2pe_official"
def _vlm(family: str):
    return build_vlm(family)


IMAGE_TOKENS = {"llava": 16, "internvl": 4, "gemma3": 4}
FAMILIES = sorted(IMAGE_TOKENS)


def _row(family: str, before: list[int], after: list[int]) -> torch.Tensor:
    return torch.tensor(before + [IMAGE] * IMAGE_TOKENS[family] + after)


def _pixels(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _generate(model, ids, pixels, mask=None, n=6):
    with torch.no_grad():
        return model.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              pad_token_id=0, output_scores=True, return_dict_in_generate=True)


# --- the position map ------------------------------------------------------------------------------------------------
def test_official_position_ids():
    if not (FIXTURE / "reference.safetensors").exists():
        pytest.skip(f"{FIXTURE} missing (shared/ is laid out beside the repo in CI)")
    reference = load_file(str(FIXTURE / "reference.safetensors"))
    for case in json.loads((FIXTURE / "cases.json").read_text()):
        ids = reference[f"case{case['case']}.input_ids"]
        ours = v2pe_position_ids(ids, image_token_id=case["image_token_id"], delta=case["delta"])
        assert torch.equal(ours.float(), reference[f"case{case['case']}.position_ids"])


def test_rule_padding_and_span_mask():
    ids = torch.tensor([[0, 0, 5, 9, 9, 9, 6, 9, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 0, 0.25, 0.5, 0.75, 2, 2.25, 4]], dtype=torch.float64)
    assert torch.equal(v2pe_position_ids(ids, image_token_id=9, delta=0.25, attention_mask=mask), expected)
    assert torch.equal(v2pe_position_ids(span_mask=ids == 9, delta=0.25, attention_mask=mask), expected)
    plain = v2pe_position_ids(ids, image_token_id=9, delta=1, attention_mask=mask)
    assert torch.equal(plain, torch.tensor([[1, 1, 0, 1, 2, 3, 4, 5, 6]], dtype=torch.float64))


def test_exact_at_300k_tokens():
    """δ = 1/256 at ~300k positions: every position exact (p + k/256 from integer counts), and the rotary angle of
    the patched model computed from them in fp64 — where transformers' fp32 positions merge neighbouring tokens."""
    text, image = 299_000, 256 * 16
    start = text - 1000  # the span at ~298k positions, where fp32's spacing is 1/32
    span = torch.zeros(1, text + image, dtype=torch.bool)
    span[0, start: start + image] = True
    pos = v2pe_position_ids(span_mask=span, delta=1 / 256)
    k = torch.arange(1, image + 1, dtype=torch.float64)
    assert torch.equal(pos[0, start: start + image], (start - 1) + k / 256)
    assert pos[0, -1].item() == text - 1 + 16  # after the span: ceil(p + 16) + 1, then the rest of the text
    image_pos = pos[0, start: start + image]
    assert image_pos.unique().numel() == image and image_pos.float().unique().numel() < image // 4  # fp32 merges

    model = _vlm("llava")
    longctx.patch(model, "v2pe", delta=1 / 256)
    rotary = model.model.language_model.rotary_emb
    x = torch.zeros(1, 1, 32)
    cos, sin = rotary(x, image_pos[None])
    angles = image_pos[:, None] * rotary.inv_freq.double()[None]
    expected = torch.cat((angles, angles), -1)
    torch.testing.assert_close(cos[0].double(), expected.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0].double(), expected.sin(), atol=1e-6, rtol=0)
    assert cos[0].unique(dim=0).shape[0] == image  # every image token keeps its own rotation


# --- tiny vision-language models -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_delta_one_is_the_unpatched_model(family):
    model = _vlm(family)
    assert "v2pe" in longctx.inspect(model).methods and "v2pe" not in longctx.inspect(build("llama")).methods
    ids = _row(family, [1, 5], [7, 8, 9])[None]
    before = _generate(model, ids, _pixels(1))
    info = longctx.patch(model, "v2pe", delta=1)
    assert "experiment" in " ".join(info.notes)
    after = _generate(model, ids, _pixels(1))
    assert torch.equal(before.sequences, after.sequences)
    assert all(torch.equal(a, b) for a, b in zip(before.scores, after.scores))
    longctx.unpatch(model)
    assert torch.equal(_generate(model, ids, _pixels(1)).sequences, before.sequences)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("delta", [1 / 4, 1 / 16])
def test_left_padded_batch_equals_single_rows(family, delta):
    """Prefill and generate with δ < 1 change the model's output, and a left-padded batch of two rows gives each row
    what it gives alone (new tokens continue from each row's own last position)."""
    model = _vlm(family)
    rows = [_row(family, [1, 5, 6], [7, 8, 9, 10]), _row(family, [1], [7])]
    plain = [_generate(model, r[None], _pixels(1)) for r in rows]
    longctx.patch(model, "v2pe", delta=delta)
    alone = [_generate(model, r[None], _pixels(1)) for r in rows]
    assert any(not torch.allclose(a.scores[0], p.scores[0]) for a, p in zip(alone, plain))
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    batch = _generate(model, ids, _pixels(1).expand(2, -1, -1, -1).contiguous(), mask)
    for i, single in enumerate(alone):
        assert torch.equal(batch.sequences[i, width:], single.sequences[0, len(rows[i]):])
        for step in range(len(single.scores)):
            torch.testing.assert_close(batch.scores[step][i], single.scores[step][0], atol=1e-4, rtol=1e-4)


def test_auto_delta_fits_the_trained_length(caplog):
    model = _vlm("llava")  # trained 64; 52 text + 16 image tokens = 68 positions at δ = 1
    ids = torch.cat((torch.arange(1, 27), _row("llava", [], []), torch.arange(27, 53)))[None]
    assert v2pe_auto_delta(ids == IMAGE, None, 64) == 0.5  # 52 + ceil(16 · 1/2) = 60
    longctx.patch(model, "v2pe", delta=0.5)
    with torch.no_grad():
        fixed = model(input_ids=ids, pixel_values=_pixels(1)).logits
    longctx.patch(model, "v2pe")  # delta="auto", the default
    with caplog.at_level(logging.INFO, logger="longctx"), torch.no_grad():
        auto = model(input_ids=ids, pixel_values=_pixels(1)).logits
    assert "chose delta = 0.5" in caplog.text
    assert torch.equal(auto, fixed)


def test_export_round_trip(tmp_path):
    model = _vlm("llava")
    longctx.patch(model, "v2pe", delta=0.25)
    ids = _row("llava", [1, 5], [7, 8])[None]
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=_pixels(1)).logits
    result = longctx.export(model, tmp_path / "out", progress=False)
    assert result.form == "longctx" and result.params == {"delta": 0.25, "image_token_id": IMAGE,
                                                          "trained_length": 64}
    loaded = longctx.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=_pixels(1)).logits, expected)


# --- errors --------------------------------------------------------------------------------------------------------
def test_errors():
    model = _vlm("llava")
    for bad in (0, -0.5, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match=r"v2pe: delta must be a finite number > 0 and <= 1, or 'auto'"):
            longctx.patch(model, "v2pe", delta=bad)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\]"):
        v2pe_position_ids(torch.ones(1, 3, dtype=torch.long), image_token_id=1, delta=2)
    with pytest.raises(ValueError, match="names no image token"):
        longctx.patch(build("llama"), "v2pe", delta=0.5)
    model.config.text_config.rope_parameters["mrope_section"] = [2, 1, 1]
    with pytest.raises(ValueError, match="M-RoPE"):
        longctx.patch(model, "v2pe", delta=0.5)
    assert not longctx.is_patched(model)


def test_qwen2_vl_is_refused():
    """A real M-RoPE class (Qwen2-VL, tiny, from its config) gets the error that names what is supported."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(
        "qwen2_vl", image_token_id=IMAGE,
        text_config={**VLM_TEXT, "num_hidden_layers": 1, "eos_token_id": 2,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4}},
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, in_chans=3, patch_size=4,
                           spatial_merge_size=1))
    model = AutoModelForImageTextToText.from_config(config)
    with pytest.raises(ValueError, match="M-RoPE .* supports Llava, InternVL, Gemma3"):
        longctx.patch(model, "v2pe", delta=0.5)
