"""CLEX: the official layer's frequencies, released checkpoints on transformers' own classes, the training-free limit
(= ntk with alpha = 2t - 1 on every family), the KV cache across a t boundary, log_scale, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import FAMILIES, SHARED, TRAINED, build
from safetensors.torch import load_file, save_file

import longctx
from longctx.core.clex import ODE_KEYS, clex_inv_freq_table, clex_scale, clex_training_free_table
from longctx.core.rope import default_inv_freq

FIXTURE = SHARED / "fixtures" / "clex_official"
import longctx.patches.clex as clex_patch  # noqa: E402


@pytest.fixture(scope="module")
def official():
    if not (FIXTURE / "reference.safetensors").exists():
        pytest.skip(f"{FIXTURE} missing (shared/ is laid out beside the repo in CI)")
    case = json.loads((FIXTURE / "cases.json").read_text())[0]
    tensors = {k[2:]: v for k, v in load_file(str(FIXTURE / "reference.safetensors")).items()}
    return case, tensors


def _ode_file(tmp_path, up, down):
    path = tmp_path / "ode.safetensors"
    save_file({f"model.{ODE_KEYS[0]}": up.contiguous(), f"model.{ODE_KEYS[1]}": down.contiguous()}, str(path))
    return path


def _random_ode(dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim // 2, dim, generator=g) * 0.3, torch.randn(dim, dim // 2, generator=g) * 0.3


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# --- the official layer --------------------------------------------------------------------------------------------
def test_frequencies_equal_the_official_layer(official):
    case, ref = official
    scaling = case["rope_scaling"]
    assert torch.equal(default_inv_freq(case["head_dim"], case["rope_theta"]), ref["inv_freq"])
    table = clex_inv_freq_table(ref["inv_freq"], ref["ode_up_proj"], ref["ode_down_proj"], scaling["act"],
                                scaling["max_factor"], scaling["time_dt"])
    torch.testing.assert_close(table, ref["freq_by_t"], atol=1e-5, rtol=1e-5)


def test_cos_sin_equal_the_official_layer(official, tmp_path):
    """A Llama with the case's head dim and theta, patched with the case's ODE weights: its rotary module returns the
    official cos/sin for every length (t = ceil(n / L) up to max_factor; the official layer stops at max_factor·L
    rows, ours goes on at the largest scale)."""
    case, ref = official
    scaling = case["rope_scaling"]
    model = build("llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=case["head_dim"],
                  max_position_embeddings=case["trained_length"])
    model.config.rope_parameters["rope_theta"] = case["rope_theta"]
    longctx.patch(model, "clex", max_factor=scaling["max_factor"], act=scaling["act"], time_dt=scaling["time_dt"],
                  ode_weights=str(_ode_file(tmp_path, ref["ode_up_proj"], ref["ode_down_proj"])))
    table = clex_inv_freq_table(ref["inv_freq"], ref["ode_up_proj"], ref["ode_down_proj"], scaling["act"],
                                scaling["max_factor"], scaling["time_dt"])
    for n in case["lengths"]:
        expected = ref[f"cos_sin.len{n}"]
        rows = expected.shape[1]
        x = torch.zeros(1, n, 64)
        cos, sin = model.model.rotary_emb(x, torch.arange(n)[None])
        # both sides take cos/sin of an fp32 angle p·f; for the ODE's large frequencies (p·f up to ~6e4) the fp32
        # angle and the cos/sin routines' argument reduction (which torch releases vectorise differently) carry a
        # few ulps of the angle: the tolerance is 1e-5 plus 8 ulps of |p·f|, the error budget of fp32 angles
        t = clex_scale(n, case["trained_length"], scaling["max_factor"])
        angle = (torch.arange(rows, dtype=torch.float64)[:, None] * table[t - 1].double()).repeat(1, 2)
        budget = 1e-5 + 8 * torch.finfo(torch.float32).eps * angle.abs()
        for ours, theirs in ((cos[0, :rows], expected[0]), (sin[0, :rows], expected[1])):
            excess = (ours.double() - theirs.double()).abs() - budget
            assert excess.max() <= 0, (n, excess.max().item())


def test_scale_rule():
    assert [clex_scale(n, 64, 8) for n in (1, 64, 65, 128, 129, 512, 513, 10_000)] == [1, 1, 2, 2, 3, 8, 8, 8]


# --- the training-free limit ---------------------------------------------------------------------------------------
def test_zero_dynamics_integrate_to_the_closed_form():
    inv = default_inv_freq(16, 10000.0)
    up, _ = _random_ode(16)
    integrated = clex_inv_freq_table(inv, up, torch.zeros(16, 8), "tanh", 8, 0.01)
    torch.testing.assert_close(integrated, clex_training_free_table(16, 10000.0, 8), atol=0, rtol=2e-5)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("n", [TRAINED, TRAINED + 1, 3 * TRAINED + 5])
def test_training_free_equals_ntk_at_each_t(model_type, n):
    """Without learned weights clex is NTK scaling with alpha = 2t - 1, t = ceil(n / L): bit for bit."""
    model = build(model_type)
    ids = torch.randint(5, 100, (1, n), generator=torch.Generator().manual_seed(n))
    info = longctx.patch(model, "clex", max_factor=8)
    assert info.params["training_free"] is True and "training-free" in " ".join(info.notes)
    ours = _logits(model, ids)
    longctx.unpatch(model)
    t = clex_scale(n, TRAINED, 8)
    if t == 1:
        expected = _logits(model, ids)
    else:
        longctx.patch(model, "ntk", factor=8, alpha=2.0 * t - 1)
        expected = _logits(model, ids)
        longctx.unpatch(model)
    assert torch.equal(ours, expected)


# --- released checkpoints ------------------------------------------------------------------------------------------
def _released(tmp_path, model, up, down, log_scale=True, with_weights=True):
    """``model`` saved the way the CLEX authors release checkpoints."""
    folder = tmp_path / "clex-release"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]  # the 4.36-era layout: a top-level rope_theta
    config.update(rope_theta=theta, log_scale=log_scale, use_flashattn=True,
                  rope_scaling={"type": "clex", "max_factor": 4, "param_factor": 1, "act": "tanh", "time_dt": 0.01},
                  architectures=["LlamaForCausalLM"],
                  auto_map={"AutoConfig": "configuration_clex.CLEXLlamaConfig",
                            "AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    if with_weights:
        weights = load_file(str(folder / "model.safetensors"))
        weights[f"model.{ODE_KEYS[0]}"], weights[f"model.{ODE_KEYS[1]}"] = up, down
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_released_checkpoint_loads_on_transformers_own_class(tmp_path, caplog):
    model = build("llama")
    up, down = _random_ode(8)
    folder = _released(tmp_path, model, up, down)
    with caplog.at_level("WARNING", logger="longctx"):
        loaded = longctx.load(folder)
    assert type(loaded).__name__ == "LlamaForCausalLM" and "without remote code" in caplog.text
    info = longctx.patch_info(loaded)
    assert info.method == "clex" and info.params["max_factor"] == 4 and info.params["log_scale"] is True
    assert "training_free" not in info.params
    ids = torch.randint(5, 100, (1, 150))
    longctx.patch(model, "clex", max_factor=4, log_scale=True, ode_weights=str(_ode_file(tmp_path, up, down)))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    # the learned dynamics matter: the training-free limit gives other logits past L
    longctx.patch(model, "clex", max_factor=4, log_scale=True)
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max() > 1e-3
    # and it exports and reloads (the ODE weights travel in the export)
    result = longctx.export(folder, tmp_path / "out", progress=False)
    assert result.method == "clex" and (tmp_path / "out" / "clex_ode.safetensors").exists()
    assert result.params["ode_weights"] == "./clex_ode.safetensors"
    assert torch.equal(_logits(longctx.load(tmp_path / "out"), ids), _logits(loaded, ids))


def test_released_checkpoint_without_ode_weights(tmp_path):
    model = build("llama")
    folder = _released(tmp_path, model, None, None, with_weights=False)
    with pytest.raises(FileNotFoundError, match="allow_training_free=True"):
        longctx.load(folder)
    loaded = longctx.load(folder, allow_training_free=True)
    assert longctx.patch_info(loaded).params["training_free"] is True


# --- the KV cache, batches, log_scale ----------------------------------------------------------------------------------
def test_cached_generation_equals_recomputation_across_t(tmp_path, monkeypatch):
    """One layer (deeper models also carry hidden states computed at the earlier t, which no cache can undo): greedy
    decoding with the cache equals recomputing the sequence at every step while t steps 1 -> 2 -> 3, and the cached
    keys are re-rotated once per step up, not at every step."""
    model = build("llama", num_hidden_layers=1)
    up, down = _random_ode(8, seed=1)
    longctx.patch(model, "clex", max_factor=4, log_scale=True, ode_weights=str(_ode_file(tmp_path, up, down)))
    calls = []
    original = clex_patch.rotate_by_angles
    monkeypatch.setattr(clex_patch, "rotate_by_angles", lambda *a: calls.append(1) or original(*a))
    prompt = torch.randint(5, 100, (1, TRAINED - 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=TRAINED + 10, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    assert len(calls) == 2  # t: 1 -> 2 at 65 tokens, 2 -> 3 at 129
    seq = out.sequences
    for step, scores in enumerate(out.scores):
        n = prompt.shape[1] + step
        full = _logits(model, seq[:, :n], use_cache=False)[:, -1]
        torch.testing.assert_close(scores, full, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_equals_single_rows():
    model = build("llama")
    longctx.patch(model, "clex", max_factor=4, log_scale=True)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(5, 100, (n,), generator=g) for n in (70, 100)]  # both t = 2
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = _logits(model, ids, attention_mask=mask, position_ids=positions)
    for i, r in enumerate(rows):
        torch.testing.assert_close(batch[i, width - len(r):], _logits(model, r[None])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_log_scale_multiplies_queries(attn):
    """log_scale=True is log_scale=False with the query projection scaled by log(n) / log(L), on both backends."""
    n = 150
    ids = torch.randint(5, 100, (1, n), generator=torch.Generator().manual_seed(1))
    model = build("llama", num_hidden_layers=1)
    model.set_attn_implementation(attn)
    longctx.patch(model, "clex", max_factor=4, log_scale=True)
    scaled = _logits(model, ids)
    longctx.patch(model, "clex", max_factor=4, log_scale=False)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(torch.log(torch.tensor(float(n))) / torch.log(torch.tensor(64.0)))
    torch.testing.assert_close(scaled, _logits(model, ids), atol=1e-5, rtol=1e-5)
    longctx.unpatch(model)
    assert model.config._attn_implementation == attn


# --- errors --------------------------------------------------------------------------------------------------------
def test_errors(tmp_path):
    model = build("llama")
    with pytest.raises(ValueError, match="max_factor must be an integer >= 1"):
        longctx.patch(model, "clex", max_factor=0)
    with pytest.raises(ValueError, match="act must be one of"):
        longctx.patch(model, "clex", max_factor=4, act="relu")
    with pytest.raises(FileNotFoundError, match="no CLEX ODE weights"):
        longctx.patch(model, "clex", max_factor=4, ode_weights=str(tmp_path))
    wrong = _ode_file(tmp_path, *_random_ode(16))
    with pytest.raises(ValueError, match="do not fit a rotary dim of 8"):
        longctx.patch(model, "clex", max_factor=4, ode_weights=str(wrong))
    assert not longctx.is_patched(model)
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    with pytest.raises(ValueError, match="no rotary position embeddings"):
        longctx.patch(bert, "clex", max_factor=4)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_learned_weights_on_every_family(tmp_path, model_type):
    """Learned ODE weights sized for each family's rotary dim: past L they change the logits against the training-free
    limit, within L they are the model's own frequencies (t = 1), and unpatch is bit-exact."""
    from longctx.models import find_rotary_modules, rotary_dim

    model = build(model_type)
    config = find_rotary_modules(model)[0].config
    params = config.rope_parameters.get("full_attention", config.rope_parameters)
    weights = str(_ode_file(tmp_path, *_random_ode(rotary_dim(config, params), seed=2)))
    long_ids = torch.randint(5, 100, (1, 2 * TRAINED + 3), generator=torch.Generator().manual_seed(0))
    short_ids = long_ids[:, :TRAINED]
    before_long, before_short = _logits(model, long_ids), _logits(model, short_ids)
    longctx.patch(model, "clex", max_factor=4, ode_weights=weights)
    learned_long, learned_short = _logits(model, long_ids), _logits(model, short_ids)
    longctx.patch(model, "clex", max_factor=4)
    assert (learned_long - _logits(model, long_ids)).abs().max() > 1e-4
    torch.testing.assert_close(learned_short, before_short, atol=1e-5, rtol=0)
    longctx.unpatch(model)
    assert torch.equal(_logits(model, long_ids), before_long)


def _family_model(model_type: str):
    import transformers

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=TRAINED)
    extra = {"phi": {"partial_rotary_factor": 0.5}, "mixtral": {"num_local_experts": 2, "num_experts_per_tok": 1,
                                                              "num_key_value_heads": 2}}[model_type]
    config = transformers.AutoConfig.for_model(model_type, **common, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type, rot", [("phi", 4), ("mixtral", 8)])
def test_released_phi_and_mixtral_layouts(tmp_path, model_type, rot):
    """CLEX-Phi-2 and CLEX-Mixtral releases map onto transformers' PhiForCausalLM / MixtralForCausalLM (Phi's ODE is
    sized for its partial rotary dim)."""
    model = _family_model(model_type)
    up, down = _random_ode(rot, seed=4)
    folder = _released(tmp_path, model, up, down)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, architectures=[f"CLEX{type(model).__name__}"])
    (folder / "config.json").write_text(json.dumps(config))
    loaded = longctx.load(folder)
    assert type(loaded) is type(model)
    ids = torch.randint(5, 100, (1, 150))
    longctx.patch(model, "clex", max_factor=4, log_scale=True, ode_weights=str(_ode_file(tmp_path, up, down)))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_unsupported_clex_family(tmp_path):
    model = build("llama")
    folder = _released(tmp_path, model, *_random_ode(8))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="llama, mistral, mixtral, phi, qwen2"):
        longctx.load(folder)
