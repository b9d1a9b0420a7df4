"""``longctx.export``: round trips for every method and family, both config forms, safety (atomic writes, kill)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, REPO, build

import longctx
import longctx.export as export_mod  # the package; calling it (longctx.export(...)) exports
import longctx.export.files as files_mod
import longctx.export.forms as forms_mod
from longctx.eval.export_checks import export_checks
from longctx.registry import registry

ROPE_FAMILIES = ["llama", "qwen2", "gemma3_text", "phi3", "gpt_neox", "modernbert"]
# every registered RoPE method, with parameters; a method registered without a row here fails the coverage test
ROPE_ROWS = {
    "pi": {"target_length": 256},
    "ntk": {"factor": 4},
    "dynamic_ntk": {"factor": 4},
    "yarn": {"target_length": 256},
    "longrope": {"target_length": 256},
    "selfextend": {"group_size": 4, "window": 16},
    "clex": {"max_factor": 4},
}
ABSOLUTE_ROWS = {
    "grouped": {"target_length": 128},
    "recurrent": {"target_length": 128},
    "pcw": {"target_length": 128},
    "pi_absolute": {"target_length": 128, "mode": "cubic"},
}
IDS = torch.randint(5, 100, (1, 200), generator=torch.Generator().manual_seed(0))


def _out(model, ids=IDS):
    from longctx.models import unwrap

    with torch.no_grad():
        out = unwrap(model)(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _plain(path: Path, family: str):
    import transformers

    cls = getattr(transformers, FAMILIES[family][1])
    extra = {"attn_implementation": "eager"} if family == "gemma3_text" else {}
    return cls.from_pretrained(path, **extra).eval()


def _saved(tmp_path: Path, family: str):
    model = build(family)
    model.save_pretrained(tmp_path / "src")
    return model, tmp_path / "src"


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


OTHER_ROWS = {"v2pe": "tests/patches/test_v2pe.py::test_export_round_trip (a tiny Llava)",
              "dca": "tests/patches/test_pairmap_methods.py::test_dca_export_writes_vllms_config_and_loads_back",
              "rerope": "tests/patches/test_pairmap_methods.py::test_dca_export_writes_vllms_config_and_loads_back",
              "string": "tests/contract/test_contract.py::test_save_pretrained_round_trip (decoders, the longctx block)"}


def test_every_method_has_an_export_row():
    assert set(registry) == set(ROPE_ROWS) | set(ABSOLUTE_ROWS) | set(OTHER_ROWS)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
@pytest.mark.parametrize("method", list(ROPE_ROWS))
def test_round_trip(tmp_path, family, method):
    """The export, loaded by plain transformers (standard form) or longctx.load (longctx form), gives the patched
    model's logits bit for bit; the base model's files come back untouched where longctx re-applies."""
    model, src = _saved(tmp_path, family)
    result = longctx.export(src, tmp_path / "out", method, progress=False, **ROPE_ROWS[method])
    base = _out(model)
    longctx.patch(model, method, **ROPE_ROWS[method])
    expected = _out(model)
    out = tmp_path / "out"
    config = _config(out)
    if result.form == "config":
        assert torch.equal(_out(_plain(out, family)), expected)
        assert longctx.api.CONFIG_KEY not in config
    else:
        assert result.form == "longctx"
        assert config[longctx.api.CONFIG_KEY]["method"] == method
        assert torch.equal(_out(_plain(out, family)), base)  # plain transformers: the base model
        assert config["rope_parameters"] == _config(src)["rope_parameters"]
        loaded = _out(longctx.load(out))
        if family == "gemma3_text":  # longctx.load gives sdpa; the built model is eager (its unextended layers too)
            torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=0)
        else:
            assert torch.equal(loaded, expected)
    nonstandard = method in ("selfextend", "clex") or (family == "phi3" and method not in ("ntk", "longrope"))
    expected_form = "longctx" if nonstandard else "config"
    assert result.form == expected_form  # Phi3Config accepts only 'default' and 'longrope' rope types
    assert (out / "README.md").read_text().count(method) >= 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial sibling left


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt_neox"])
@pytest.mark.parametrize("method", ["pi", "ntk", "dynamic_ntk", "yarn"])
def test_legacy_form_is_consistent_and_loads_alone(tmp_path, family, method):
    """rope_scaling + top-level rope_theta agree with rope_parameters, and a config.json carrying only the 4.x form
    (what older readers see) gives the same logits; max_position_embeddings counts the served length the vLLM way."""
    model, src = _saved(tmp_path, family)
    result = longctx.export(src, tmp_path / "out", method, progress=False, **ROPE_ROWS[method])
    longctx.patch(model, method, **ROPE_ROWS[method])
    config = _config(tmp_path / "out")
    def rope_of(config):
        return config["rope_parameters"]["full_attention"] if family == "gemma3_text" else config["rope_parameters"]

    params = rope_of(config)
    L, target = result.trained_length, result.target_length
    assert config["rope_theta"] == params["rope_theta"]
    if family == "gpt_neox":  # its 4.x config reads θ and the rotary fraction under its own names only
        assert config["rotary_emb_base"] == params["rope_theta"] and config["partial_rotary_factor"] == 0.5
        assert config["rotary_pct"] == params["partial_rotary_factor"] == 0.5
    if method == "ntk":
        assert config["rope_scaling"] is None and params["rope_type"] == "default"
    else:
        legacy = dict(config["rope_scaling"])
        assert legacy.pop("type") == legacy["rope_type"] == {"pi": "linear", "dynamic_ntk": "dynamic"}.get(method, method)
        if method == "yarn":  # transformers 4.51-4.57 would derive the factor from max / original: kept out
            params = {k: v for k, v in params.items() if k != "original_max_position_embeddings"}
            assert rope_of(config)["original_max_position_embeddings"] == config["original_max_position_embeddings"] == L
        # θ and the rotary fraction go top level only (transformers 4.x warns on them inside rope_scaling)
        assert legacy == {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    # readers count from the trained length for linear, dynamic and yarn (vLLM serves L x factor); a θ change: target
    assert config["max_position_embeddings"] == (target if method == "ntk" else L)
    if method != "ntk":
        assert L * params["factor"] == pytest.approx(target)
    # what save_pretrained writes of the patched model is what the export wrote
    model.save_pretrained(tmp_path / "saved")
    saved = _config(tmp_path / "saved")
    for key in ("rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings",
                "original_max_position_embeddings", "partial_rotary_factor", "rotary_emb_base", "rotary_pct"):
        assert saved.get(key) == config.get(key), key
    legacy_only = {k: v for k, v in config.items() if k != "rope_parameters"}
    (tmp_path / "out" / "config.json").write_text(json.dumps(legacy_only))
    assert torch.equal(_out(_plain(tmp_path / "out", family)), _out(model))


def test_modernbert_gets_no_4x_form(tmp_path):
    """ModernBERT's config applies rope_scaling to every layer type while longctx extends only the global layers:
    the export leaves the 4.x form out and says so, rather than writing one transformers would read wrongly."""
    _, src = _saved(tmp_path, "modernbert")
    result = longctx.export(src, tmp_path / "out", "yarn", target_length=256, progress=False)
    config = _config(tmp_path / "out")
    assert "rope_scaling" not in config and config["rope_parameters"]["sliding_attention"]["rope_type"] == "default"
    assert any("no 4.x form" in n for n in result.notes)
    assert "no 4.x form" in (tmp_path / "out" / "README.md").read_text()


def test_dynamic_cache_consistent_is_a_longctx_block(tmp_path):
    model, src = _saved(tmp_path, "llama")
    result = longctx.export(src, tmp_path / "out", "dynamic_ntk", factor=4, cache_consistent=True, progress=False)
    assert result.form == "longctx" and result.params["cache_consistent"] is True
    assert _config(tmp_path / "out")["rope_parameters"]["rope_type"] == "default"
    longctx.patch(model, "dynamic_ntk", factor=4, cache_consistent=True)
    assert torch.equal(_out(longctx.load(tmp_path / "out")), _out(model))


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("method", list(ABSOLUTE_ROWS))
def test_absolute_methods(tmp_path, method):
    """grouped/recurrent/pcw: the base files + a longctx block; pi: the interpolated table in the weights, loadable
    at the new length by plain transformers, and longctx.load restores the anchor mapping."""
    from transformers import BertModel

    model = _bert()
    model.save_pretrained(tmp_path / "src")
    name = "pi" if method == "pi_absolute" else method
    params = ABSOLUTE_ROWS[method]
    result = longctx.export(tmp_path / "src", tmp_path / "out", name, progress=False, **params)
    base = _out(model, IDS[:, :60])
    longctx.patch(model, name, **params)
    ids = IDS[:, :120]
    assert torch.equal(_out(longctx.load(tmp_path / "out"), ids), _out(model, ids))
    plain = BertModel.from_pretrained(tmp_path / "out").eval()
    if method == "pi_absolute":
        assert result.form == "weights"
        assert _config(tmp_path / "out")["max_position_embeddings"] == 128 == plain.embeddings.position_embeddings.num_embeddings
        assert _out(plain, ids).shape == (1, 120, 32)  # reads past the trained 64 positions without longctx
    else:
        assert result.form == "longctx"
        assert _config(tmp_path / "out")["max_position_embeddings"] == 64
        assert torch.equal(_out(plain, IDS[:, :60]), base)


def test_model_in_memory(tmp_path):
    model = build("llama")
    with pytest.raises(ValueError, match="not patched"):
        longctx.export(model, tmp_path / "a")
    # with a method: patched for the export, left as found
    longctx.export(model, tmp_path / "a", "yarn", target_length=256, progress=False)
    assert not longctx.is_patched(model)
    longctx.patch(model, "yarn", target_length=256)
    assert torch.equal(_out(_plain(tmp_path / "a", "llama")), _out(model))
    with pytest.raises(ValueError, match="already patched with 'yarn'"):
        longctx.export(model, tmp_path / "b", "pi", factor=2)
    longctx.unpatch(model)
    # a patched model, longctx form: the base is saved, the model stays patched with the same outputs
    info = longctx.patch(model, "selfextend", group_size=4, window=16)
    expected = _out(model)
    result = longctx.export(model, tmp_path / "c", progress=False)
    assert result.form == "longctx" and longctx.patch_info(model) == info
    assert torch.equal(_out(model), expected)
    assert torch.equal(_out(longctx.load(tmp_path / "c")), expected)
    assert _config(tmp_path / "c")["max_position_embeddings"] == 64  # the base config, not the patched one


def test_selfextend_record_keeps_the_requested_backend(tmp_path):
    """The record re-requests 'auto' (resolved where the export is loaded), not the backend resolved on this CPU."""
    _, src = _saved(tmp_path, "llama")
    result = longctx.export(src, tmp_path / "out", "selfextend", group_size=4, window=16, progress=False)
    assert result.params["attn_backend"] == "auto"
    assert longctx.patch_info(longctx.load(tmp_path / "out")).params["attn_backend"] == "torch"


# --- safety -----------------------------------------------------------------------------------------------------
def test_existing_out_needs_overwrite(tmp_path):
    _, src = _saved(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        longctx.export(src, out, "pi", factor=2, progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    longctx.export(src, out, "pi", factor=2, overwrite=True, progress=False)
    assert not (out / "mine.txt").exists() and _config(out)["rope_parameters"]["rope_type"] == "linear"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("method, params, error, match", [
    ("grouped", {"target_length": 256}, ValueError, "no learned absolute position table"),
    ("pi", {"factor": 0.5}, ValueError, "factor"),
    ("nope", {"factor": 2}, ValueError, "unknown method 'nope'"),
    ("selfextend", {"group_size": 4, "window": 16, "bogus": 1}, TypeError, "unknown parameter"),
])
def test_bad_method_writes_nothing(tmp_path, method, params, error, match):
    _, src = _saved(tmp_path, "llama")
    with pytest.raises(error, match=match):
        longctx.export(src, tmp_path / "out", method, progress=False, **params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_rope_method_on_bert_and_bad_sources(tmp_path):
    _bert().save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="no rotary position embeddings"):
        longctx.export(tmp_path / "bert", tmp_path / "out", "yarn", factor=2, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model at"):
        longctx.export(tmp_path / "empty", tmp_path / "out", "yarn", factor=2, progress=False)
    with pytest.raises(ValueError, match="outside the source"):
        longctx.export(tmp_path / "bert", tmp_path / "bert" / "inner", "grouped", factor=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    _, src = _saved(tmp_path, "llama")
    calls = []

    def failing(a, b):
        calls.append(a)
        raise OSError("disk full")

    monkeypatch.setattr(files_mod, "copy_file", failing)
    with pytest.raises(OSError, match="disk full"):
        longctx.export(src, tmp_path / "out", "yarn", factor=2, progress=False)
    assert calls and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_killed_export_leaves_no_out(tmp_path):
    """SIGKILL while copying: no OUT (only a hidden partial sibling, which the next export removes)."""
    _, src = _saved(tmp_path, "llama")
    out = tmp_path / "out"
    child = textwrap.dedent(f"""
        import sys, time
        import longctx
        import longctx.export.files as e
        original = e.copy_file
        def slow(a, b):
            original(a, b)
            print("COPIED", flush=True)
            time.sleep(120)
        e.copy_file = slow
        longctx.export({str(src)!r}, {str(out)!r}, "yarn", factor=2, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert proc.stdout.readline().strip() == "COPIED"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not out.exists()
    partials = [p for p in tmp_path.iterdir() if p.name.startswith(".out.longctx-partial-")]
    assert len(partials) == 1 and any(partials[0].iterdir())
    longctx.export(src, out, "yarn", factor=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# --- verify -----------------------------------------------------------------------------------------------------
def test_verify_compares_and_catches_a_wrong_config(tmp_path, monkeypatch):
    _, src = _saved(tmp_path, "llama")
    result = longctx.export(src, tmp_path / "ok", "yarn", target_length=256, verify=True,
                            checks=export_checks(verify=True), progress=False)
    assert result.verify["max_abs_diff"] == 0.0 and result.verify["tokens"] == 128
    assert result.checks["verify_passkey"]["data"] == []  # the tiny model has no tokenizer: no passkey rows
    card = (tmp_path / "ok" / "README.md").read_text()
    assert "Verification" in card and "No tokenizer in the export: no passkey run." in card

    standard = forms_mod.standard_params

    def wrong(params):  # a bug that would write twice the factor
        return {**standard(params), "factor": 2 * params["factor"]}

    monkeypatch.setattr(forms_mod, "standard_params", wrong)
    with pytest.raises(export_mod.ExportError, match="differ"):
        longctx.export(src, tmp_path / "bad", "yarn", target_length=256, verify=True, progress=False)
    assert not (tmp_path / "bad").exists()


def test_export_benchmark_script_runs(tmp_path):
    """bench/export_speed.py on a small model (the docs/export.md figure comes from its default size)."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "export_speed.py"), "--megabytes", "8", "--repeats",
                           "1", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["export_seconds"] > 0 and report["copy_seconds"] > 0 and report["ratio"] > 0


def test_an_overwrite_killed_between_its_renames_is_restored_by_the_next_export(tmp_path):
    """A killed overwrite can leave the previous export only under its hidden name (OUT renamed aside, the new one
    not yet in place): the next export to OUT puts it back before doing anything else."""
    _, src = _saved(tmp_path, "llama")
    out = tmp_path / "out"
    longctx.export(src, out, "yarn", factor=2, progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    aside = tmp_path / f".out.longctx-old-{dead}"
    os.rename(out, aside)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):  # restored first: OUT exists again
        longctx.export(src, out, "pi", factor=2, progress=False)
    assert _config(out)["rope_parameters"]["rope_type"] == "yarn" and not aside.exists()


# --- config_for: the reading a standard config is written for ---------------------------------------------------
def test_config_for_vllm_writes_yarn_as_vllm_serves_it(tmp_path):
    """vLLM >= 0.30 serves a yarn config at max_position_embeddings and vLLM <= 0.11 needs the trained length inside
    rope_scaling: config_for="vllm" writes both; transformers 5 reads it to the same logits; the card says who
    reads it wrongly (transformers <= 4.50)."""
    model, src = _saved(tmp_path, "llama")
    result = longctx.export(src, tmp_path / "out", "yarn", target_length=256, config_for="vllm", verify=True,
                            progress=False)
    config = _config(tmp_path / "out")
    assert config["max_position_embeddings"] == 256 and config["rope_scaling"]["original_max_position_embeddings"] == 64
    assert result.config_for == "vllm" and result.verify["max_abs_diff"] == 0.0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "written for the vllm reading" in card and "transformers ≤ 4.50" in card
    longctx.patch(model, "yarn", target_length=256)
    assert torch.equal(_out(_plain(tmp_path / "out", "llama")), _out(model))
    # the default: every transformers release, and the card names the vLLM releases that need the other reading
    default = longctx.export(src, tmp_path / "default", "yarn", target_length=256, progress=False)
    assert default.config_for == "transformers" and any("vLLM ≥ 0.30" in n for n in default.notes)


def test_config_for_changes_nothing_where_one_config_serves_every_runtime(tmp_path):
    _, src = _saved(tmp_path, "llama")
    a = longctx.export(src, tmp_path / "a", "pi", target_length=256, progress=False)
    b = longctx.export(src, tmp_path / "b", "pi", target_length=256, config_for="vllm", progress=False)
    assert _config(tmp_path / "a") == _config(tmp_path / "b") and a.config == b.config
    assert any("changes nothing" in n for n in b.notes)


def test_config_for_rejects_an_unknown_reading_before_any_work(tmp_path):
    _, src = _saved(tmp_path, "llama")
    with pytest.raises(ValueError, match=r"config_for must be one of \['transformers', 'vllm', 'sglang'\], got 'tgi'"):
        longctx.export(src, tmp_path / "out", "yarn", target_length=256, config_for="tgi", progress=False)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_longrope_attention_factor_reaches_vllm_only_in_its_reading(tmp_path):
    """vLLM's get_rope reads short_mscale / long_mscale, not attention_factor: the default export's card says so for
    a non-default attention factor; config_for="vllm" writes both keys, which transformers ignores (same logits)."""
    model, src = _saved(tmp_path, "llama")
    params = dict(target_length=256, long_factor=[1.0, 1.5, 2.5, 4.0], attention_factor=1.05)
    default = longctx.export(src, tmp_path / "default", "longrope", progress=False, **params)
    assert any("vLLM ignores attention_factor (1.05)" in n for n in default.notes)
    assert "short_mscale" not in json.dumps(_config(tmp_path / "default"))
    vllm = longctx.export(src, tmp_path / "vllm", "longrope", config_for="vllm", verify=True, progress=False, **params)
    rope = _config(tmp_path / "vllm")["rope_parameters"]
    assert rope["short_mscale"] == rope["long_mscale"] == rope["attention_factor"] == 1.05
    assert vllm.verify["max_abs_diff"] == 0.0 and not any("vLLM ignores" in n for n in vllm.notes)
    assert any("short_mscale / long_mscale = the attention factor" in n for n in vllm.notes)
    longctx.patch(model, "longrope", **params)
    assert torch.equal(_out(_plain(tmp_path / "vllm", "llama")), _out(model))
    plain = longctx.export(src, tmp_path / "plain", "longrope", target_length=256, progress=False)  # the default scale
    assert not any("vLLM ignores" in n for n in plain.notes)


def test_config_for_sglang_writes_yarn_and_longrope_as_sglang_reads_them(tmp_path):
    """SGLang (from its source): context = max_position_embeddings unless rope_scaling lacks the trained length (then
    × factor), which under transformers 5 it never lacks; yarn's temperature override is attn_factor (on top of
    0.1·ln s + 1), longrope's short_mscale / long_mscale. config_for="sglang" writes those; transformers ignores the
    extra keys (same logits); the card says which engines read it."""
    model, src = _saved(tmp_path, "llama")
    result = longctx.export(src, tmp_path / "y", "yarn", target_length=256, attention_factor=1.3, config_for="sglang",
                            verify=True, progress=False)
    config = _config(tmp_path / "y")
    assert config["max_position_embeddings"] == 256 and config["rope_scaling"]["original_max_position_embeddings"] == 64
    assert config["rope_scaling"]["attn_factor"] == pytest.approx(1.3 / (0.1 * math.log(4) + 1))
    assert result.verify["max_abs_diff"] == 0.0 and any("reads the same in SGLang" in n for n in result.notes)
    longctx.patch(model, "yarn", target_length=256, attention_factor=1.3)
    assert torch.equal(_out(_plain(tmp_path / "y", "llama")), _out(model))
    longctx.unpatch(model)
    params = dict(target_length=256, long_factor=[1.0, 1.5, 2.5, 4.0], attention_factor=1.05)
    longctx.export(src, tmp_path / "l", "longrope", config_for="sglang", verify=True, progress=False, **params)
    rope = _config(tmp_path / "l")["rope_scaling"]
    assert rope["short_mscale"] == rope["long_mscale"] == 1.05
    default = longctx.export(src, tmp_path / "d", "yarn", target_length=256, progress=False)
    assert any("config_for='sglang'" in n for n in default.notes)  # the default says SGLang-on-5.x needs it


def test_longctx_form_card_says_which_engine_serves_it(tmp_path):
    """A DCA export: SGLang's serve line, vLLM's refusal (no backend since 0.11), llama.cpp's; SelfExtend: llama.cpp's
    own port named with its flags."""
    _, src = _saved(tmp_path, "llama")
    dca = longctx.export(src, tmp_path / "dca", "dca", chunk_size=32, local_window=8, target_length=256,
                         progress=False)
    card = (tmp_path / "dca" / "README.md").read_text()
    assert "--attention-backend dual_chunk_flash_attn" in card and "PR #25351" in card
    assert any(n.startswith("llama.cpp: does not run dca") for n in dca.notes)
    longctx.export(src, tmp_path / "se", "selfextend", group_size=4, window=16, progress=False)
    assert "--grp-attn-n 4 --grp-attn-w 16" in (tmp_path / "se" / "README.md").read_text()
