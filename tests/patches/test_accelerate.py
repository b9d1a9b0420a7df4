"""Patched models under accelerate's big-model loading (device_map): hooks stay, buffers stay on their device."""

from __future__ import annotations

import torch
from conftest import build
from transformers import AutoModelForCausalLM

import longctx


def test_device_map_auto_patch_and_unpatch(tmp_path):
    source = build("qwen2")
    source.save_pretrained(tmp_path)
    # one layer offloaded to disk: accelerate attaches its AlignDevicesHooks (the code path of multi-device maps)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map=device_map, offload_folder=str(tmp_path / "offload"), dtype=torch.float32
    ).eval()
    assert model.hf_device_map["model.layers.1"] == "disk"
    assert hasattr(model.model.layers[1], "_hf_hook")
    rotary = model.model.rotary_emb
    device = rotary.inv_freq.device
    ids = torch.randint(3, 120, (1, 200))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        longctx.patch(model, "yarn", factor=4)
        assert rotary is model.model.rotary_emb and rotary.inv_freq.device == device
        patched = model(input_ids=ids).logits

    longctx.patch(source, "yarn", factor=4)
    with torch.no_grad():
        expected = source(input_ids=ids).logits
    torch.testing.assert_close(patched.cpu(), expected, atol=1e-5, rtol=0)

    longctx.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
