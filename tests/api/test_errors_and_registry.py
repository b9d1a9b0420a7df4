"""Bad input gets a clear error naming what is supported; the registry describes every method."""

from __future__ import annotations

import pytest
import torch
from conftest import build

import longctx
from longctx.models import NotARopeModelError


def test_unknown_method_lists_available():
    with pytest.raises(ValueError, match=r"unknown method 'rope9000'; available methods: .*dynamic_ntk.*ntk.*pi.*yarn"):
        longctx.patch(build("llama"), "rope9000", factor=2)


def test_unknown_parameter_lists_accepted():
    with pytest.raises(TypeError, match=r"method 'yarn' got unknown parameter\(s\) \['beta_fats'\]; it accepts: .*beta_fast"):
        longctx.patch(build("llama"), "yarn", factor=2, beta_fats=16)


def test_model_without_rope_points_to_absolute_methods():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(NotARopeModelError, match="no rotary position embeddings.*absolute-position"):
        longctx.patch(bert, "yarn", factor=2)
    assert longctx.inspect(bert).position_encoding == "absolute"


@pytest.mark.parametrize("params,match", [
    ({"factor": 0.5}, "pi: factor must be a finite number >= 1, got 0.5"),
    ({"target_length": 64}, "not longer than the model's trained length 64"),
    ({"target_length": 10}, "not longer than the model's trained length 64"),
    ({}, "either factor"),
])
def test_bad_lengths(params, match):
    model = build("llama")
    with pytest.raises(ValueError, match=match):
        longctx.patch(model, "pi", **params)
    assert not longctx.is_patched(model)


def test_missing_config_fields():
    from types import SimpleNamespace

    from longctx.models import trained_length

    with pytest.raises(ValueError, match="neither original_max_position_embeddings nor max_position_embeddings"):
        trained_length(SimpleNamespace(rope_parameters={"rope_type": "default"}))
    assert trained_length(SimpleNamespace(rope_parameters={}, original_max_position_embeddings=4096)) == 4096
    model = build("llama")
    info = longctx.patch(model, "yarn", factor=2, trained_length=32)  # the documented override
    assert info.trained_length == 32 and info.target_length == 64


def test_already_scaled_model_is_refused():
    model = build("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="already uses rope_type 'linear'"):
        longctx.patch(model, "yarn", factor=2)


def test_failed_patch_leaves_model_untouched():
    model = build("llama")
    ids = torch.randint(3, 100, (1, 80))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(ValueError):
        longctx.patch(model, "yarn", factor=2, beta_fast=1, beta_slow=2)
    assert model.config.rope_parameters["rope_type"] == "default" and model.config.max_position_embeddings == 64
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_unpatch_without_patch_is_false():
    assert longctx.unpatch(build("llama")) is False


def test_methods_listing():
    listing = {m["name"]: m for m in longctx.methods()}
    assert {"pi", "ntk", "dynamic_ntk", "yarn", "selfextend"} <= set(listing)
    assert listing["selfextend"]["kind"] == "rope_attention" and not listing["selfextend"]["standard_config"]
    yarn = {p["name"]: p["default"] for p in listing["yarn"]["parameters"]}
    assert yarn["beta_fast"] == 32.0 and yarn["beta_slow"] == 1.0 and "target_length" in yarn
    assert all(m["description"] for m in listing.values())


def test_inspect_reports_rope_facts():
    info = longctx.inspect(build("gpt_neox"))
    assert info.position_encoding == "rope" and info.trained_length == 64
    assert info.head_dim == 8 and info.rotary_dim == 4 and info.rope_type == "default"
    assert set(info.methods) >= {"pi", "ntk", "dynamic_ntk", "yarn"}
    gemma3 = longctx.inspect(build("gemma3_text"))
    assert gemma3.extended_layer_types == ["full_attention"]


def test_patch_info_record_and_log(caplog):
    import logging

    model = build("llama")
    with caplog.at_level(logging.INFO, logger="longctx"):
        info = longctx.patch(model, "yarn", target_length=256)
    assert info.factor == 4.0 and info.params["beta_fast"] == 32.0
    assert longctx.patch_info(model) is info
    assert "yarn applied: trained 64 -> target 256" in caplog.text
    assert info.to_dict()["target_length"] == 256


def test_a_new_method_is_one_module(tmp_path, monkeypatch):
    """A module that declares and registers a method is found by the package's import alone: longctx.methods lists
    it, patch validates its parameters from its declaration, and patch / unpatch work — no other file edited."""
    import sys
    import textwrap

    from longctx.patches import import_methods, registry
    from longctx.patches.registry import _ALIASES

    folder = tmp_path / "probe_methods"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "halfpi.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from typing import ClassVar

        from longctx.patches.base import LengthConfig, param
        from longctx.patches.registry import Method, register
        from longctx.patches.rope_common import apply_rope_method, rope_applied

        @dataclass(frozen=True)
        class HalfPIConfig(LengthConfig):
            method: ClassVar[str] = "halfpi"
            strength: float = param(0.5, kind=float, gt=0, le=1, optional=False, doc="share of the factor")

        def apply(model, cfg, undo):
            fn = lambda cfg, p, ctx: {**p, "rope_type": "linear", "factor": 1 + cfg.strength * (ctx.factor - 1)}
            return rope_applied(apply_rope_method(model, "halfpi", cfg, fn, undo), cfg)

        register(Method("halfpi", "rope", "PI with part of the factor", HalfPIConfig, apply, export_form="config"))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import_methods("probe_methods", [str(folder)], (), set())
        assert "halfpi" in registry
        listing = {m["name"]: m for m in longctx.methods()}
        assert listing["halfpi"]["standard_config"] and listing["halfpi"]["parameters"][-1]["name"] == "strength"
        with pytest.raises(ValueError, match=r"halfpi: strength must be a finite number > 0 and <= 1, got 2"):
            longctx.patch(build("llama"), "halfpi", factor=4, strength=2)
        model = build("llama")
        ids = torch.randint(3, 100, (1, 80))
        with torch.no_grad():
            before = model(input_ids=ids).logits
        info = longctx.patch(model, "halfpi", factor=4, strength=0.5)
        assert model.config.rope_parameters == {**model.config.rope_parameters, "rope_type": "linear", "factor": 2.5}
        assert info.factor == 4
        longctx.unpatch(model)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before)
    finally:  # the registry as it was
        registry.pop("halfpi", None)
        _ALIASES.pop("halfpi", None)
        sys.modules.pop("probe_methods.halfpi", None)
        sys.modules.pop("probe_methods", None)


@pytest.mark.parametrize("method, params, warns", [("yarn", {"factor": 2.0}, True), ("selfextend", {"target_length": 128}, True),
                                                   ("dca", {"target_length": 128}, False)])
def test_an_input_past_the_target_length_is_warned_once(method, params, warns):
    """A bounded method's extension holds up to its target length: the first input past it gets one warning naming
    the method, the length and what to do; methods without a reach (DCA) warn nothing."""
    import warnings

    from conftest import build

    model = build("llama")
    longctx.patch(model, method, **params)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=torch.randint(4, 100, (1, 120)))
        assert not [w for w in caught if "longctx:" in str(w.message)]
        model(input_ids=torch.randint(4, 100, (1, 150)))
        model(input_ids=torch.randint(4, 100, (1, 160)))
    ours = [str(w.message) for w in caught if "longctx:" in str(w.message)]
    if warns:
        assert len(ours) == 1 and "150 tokens" in ours[0] and method in ours[0] and "target_length >= 150" in ours[0]
    else:
        assert not ours
