"""The defects found by trying longctx as a hostile user would (the method-contract issue), one test each, written
against the public API and the command line only — each failed before the method contract was built."""

from __future__ import annotations

import copy
import gc
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TRAINED, build

import longctx

IDS = torch.randint(4, 100, (1, 2 * TRAINED + 5), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method, params", [("yarn", {"factor": 4}), ("selfextend", {"group_size": 4, "window": 16})])
def test_unpatching_a_deep_copy_leaves_the_original_patched(method, params):
    model = build("llama")
    longctx.patch(model, method, **params)
    patched = _logits(model)
    clone = copy.deepcopy(model)
    assert torch.equal(_logits(clone), patched)  # selfextend's copy ran unextended
    longctx.unpatch(clone)
    assert longctx.is_patched(model) and model.config._attn_implementation != "sdpa" or method == "yarn"
    assert model.config.rope_parameters["rope_type"] == ("yarn" if method == "yarn" else "default")
    assert torch.equal(_logits(model), patched)


def test_save_pretrained_after_dynamic_ntk_loads_patched_everywhere(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build("llama")
    longctx.patch(model, "dynamic_ntk", factor=4)
    patched = _logits(model)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(longctx.load(tmp_path)), patched, atol=1e-6, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # was: KeyError 'longctx_dynamic'
    torch.testing.assert_close(_logits(plain), patched, atol=1e-6, rtol=0)


def test_save_pretrained_after_clex_loads_back(tmp_path):
    model = build("llama")
    longctx.patch(model, "clex", max_factor=4)
    patched = _logits(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(longctx.load(tmp_path)), patched)  # was: "already uses rope_type 'longctx_clex'"


def test_patching_one_of_two_models_sharing_a_config_leaves_the_other_alone():
    first = build("llama")
    second = type(first)(first.config).eval()
    second.load_state_dict(first.state_dict())
    before = _logits(second)
    longctx.patch(first, "selfextend", group_size=4, window=16)
    assert torch.equal(_logits(second), before)


def test_a_failed_repatch_keeps_the_earlier_patch():
    model = build("llama")
    longctx.patch(model, "yarn", factor=4)
    patched = _logits(model)
    with pytest.raises(ValueError):
        longctx.patch(model, "selfextend", group_size=4, window=TRAINED)  # impossible window
    assert longctx.patch_info(model).method == "yarn" and torch.equal(_logits(model), patched)


@pytest.mark.parametrize("method, params", [
    ("selfextend", {"group_size": 4, "window": 16, "block_size": -3}),
    ("selfextend", {"group_size": 4, "window": 16, "block_size": 0}),
    ("selfextend", {"group_size": 4, "window": 16, "scale_base": 1}),
    ("selfextend", {"group_size": 4.5, "window": 16}),
    ("ntk", {"factor": 4, "alpha": float("nan")}),
    ("yarn", {"factor": 4, "attention_factor": -1}),
    ("yarn", {"factor": 4, "trained_length": -10}),
    ("yarn", {"factor": float("inf")}),
])
def test_bad_parameters_are_refused_before_any_change(method, params):
    model = build("llama")
    before = _logits(model)
    name = next(k for k in params if k not in ("group_size", "window", "factor") or not isinstance(params[k], int))
    with pytest.raises(ValueError, match=name):
        longctx.patch(model, method, **params)
    assert not longctx.is_patched(model) and torch.equal(_logits(model), before)


def test_torch_save_of_a_patched_model():
    model = build("llama")
    longctx.patch(model, "pi", factor=4)
    patched = _logits(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # was: Can't pickle local object '_edit_config.<locals>.restore_params'
    buffer.seek(0)
    assert torch.equal(_logits(torch.load(buffer, weights_only=False)), patched)


def test_a_cast_after_patching_keeps_fp32_frequencies_and_unpatch_follows():
    model = build("llama")
    reference = copy.deepcopy(model).to(torch.float16)
    longctx.patch(model, "yarn", factor=4)
    model.to(torch.float16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    longctx.unpatch(model)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float16  # what the never-patched model holds now
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_selfextend_state_is_freed_with_a_model_never_unpatched():
    import weakref

    model = build("llama")
    longctx.patch(model, "selfextend", group_size=4, window=16)
    _logits(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    from longctx.patches import selfextend

    assert not [k for k, v in vars(selfextend).items() if isinstance(v, dict) and v and k.startswith("_")
                and not k.startswith("__")]  # no module-level per-model state


def test_export_overwrite_never_loses_the_previous_export(tmp_path, monkeypatch):
    build("llama").save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    longctx.export(tmp_path / "src", out, "yarn", factor=2, progress=False)
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new export into place
            raise OSError("injected failure between the two renames")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        longctx.export(tmp_path / "src", out, "pi", factor=2, overwrite=True, progress=False)
    monkeypatch.setattr(os, "rename", real)
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"
    longctx.export(tmp_path / "src", out, "pi", factor=2, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no hidden leftovers


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "longctx.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["inspect", "/nonexistent/model"], "no model at"),
    (["eval", "ppl", "--method", "yarnn"], "unknown method 'yarnn'"),
    (["eval", "ppl", "--lengths", "abc"], "--lengths takes comma-separated integers"),
    (["eval", "ppl", "--param", "yarn.beta_fats=3"], "beta_fats"),
    (["eval", "needle", "--lengths", "-5"], "--lengths takes comma-separated integers"),
    (["eval", "passkey", "--trials", "0"], "--trials must be an integer >= 1"),
    (["eval", "passkey", "--compare", "vanilla,bogus"], "unknown method 'bogus'"),
    (["export", "/nonexistent/model", "/tmp/x", "--method", "yarn", "--factor", "2"], "no model at"),
    (["eval", "ppl", "--max-windows", "many"], "--max-windows"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2_before_any_work(args, message):
    done = _cli(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr  # one line
    assert done.stdout == ""  # nothing ran (no model loaded, no trial)
