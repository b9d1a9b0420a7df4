"""Checks that need CUDA (marked ``gpu``: deselected where there is none, run by ``python -m pytest -m gpu`` on a
GPU machine): SelfExtend on a model that accelerate splits between the GPU and the CPU, Triton on one and the torch
path on the other, gives the logits of the same model on one device."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import longctx

pytestmark = pytest.mark.gpu


def _saved_llama(path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.1)
    LlamaForCausalLM(config).save_pretrained(path)


@pytest.mark.parametrize("method,params", [("selfextend", {"group_size": 4, "window": 16}), ("yarn", {"factor": 4})])
def test_device_map_split_gpu_cpu_gives_the_one_device_logits(tmp_path, method, params):
    _saved_llama(tmp_path)
    whole = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    layer_bytes = sum(p.numel() * 4 for p in whole.model.layers[0].parameters())
    split = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, device_map="auto",
        max_memory={0: int(3.5 * layer_bytes), "cpu": 1 << 30},
    ).eval()
    assert {0, "cpu"} <= set(split.hf_device_map.values()), split.hf_device_map  # really split
    ids = torch.randint(3, 250, (2, 200), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (whole, split):
        info = longctx.patch(model, method, **params)
        with torch.no_grad():
            results.append(model(input_ids=ids.to(model.device)).logits.float().cpu())
        if method == "selfextend":
            assert info.params["attn_backend"] == "auto" and "backend=auto" in info.notes[0]
        for name, buf in model.named_buffers():  # rotary tables stay with their layers
            if name.endswith("inv_freq"):
                owner = model.get_submodule(name.rsplit(".", 1)[0])
                assert buf.device == next(iter(owner.buffers())).device
        longctx.unpatch(model)
    torch.testing.assert_close(results[1], results[0], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("method,params", [("yarn", {"factor": 4}), ("selfextend", {"group_size": 4, "window": 16})])
def test_a_move_to_the_gpu_after_patching_keeps_fp32_frequencies_and_unpatch_follows(tmp_path, method, params):
    """.to("cuda") / .to(bfloat16) after a patch: the rotary frequencies stay fp32, on the GPU; unpatch restores what
    the never-patched model would hold after the same moves (on the GPU, in its dtype)."""
    import copy

    _saved_llama(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reference = copy.deepcopy(model).to("cuda").to(torch.bfloat16)
    longctx.patch(model, method, **params)
    model.to("cuda").to(torch.bfloat16)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.device.type == "cuda" and rotary.inv_freq.dtype == torch.float32
    ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    longctx.unpatch(model)
    for (name, buf), (_, ref) in zip(model.named_buffers(), reference.named_buffers()):
        assert buf.device == ref.device and buf.dtype == ref.dtype and torch.equal(buf, ref), name
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
