"""GGUF exports (``longctx export SRC OUT.gguf``): the file, its rope metadata as llama.cpp reads it, its weights.

Running llama.cpp itself is slow-marked (``tests/engines/test_llamacpp.py``: it needs llama-cpp-python, which
builds llama.cpp). Here the metadata is read back with the ``gguf`` package and turned into frequencies by llama.cpp's
own rules, transcribed from its source (``ggml_rope_yarn_corr_dims`` / ``rope_yarn`` in ggml-cpu's ops.cpp and
``llama_context``'s attention-factor handling, llama.cpp 0c1e570), and compared with transformers' frequencies for
the patched model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

import longctx
from longctx.cli import app
from longctx.export.gguf import rope_inputs
from longctx.patches.portable import NotStandard, gguf_rope

gguf = pytest.importorskip("gguf")


def llama_cpp_rope(kv: dict, tensors: dict, n_rot: int, arch: str = "llama", n_ctx: int = 4096
                   ) -> tuple[np.ndarray, float]:
    """(per-pair angle per position, cos / sin factor) llama.cpp computes from a GGUF's rope metadata."""
    base = kv.get(f"{arch}.rope.freq_base", 10000.0)
    kind = kv.get(f"{arch}.rope.scaling.type", "linear")
    factor = kv.get(f"{arch}.rope.scaling.factor", 0.0)
    freq_scale = 1.0 if kind == "none" or not factor else 1.0 / factor
    orig = kv.get(f"{arch}.rope.scaling.original_context_length", kv[f"{arch}.context_length"])
    ext = 1.0 if kind == "yarn" else 0.0
    attn = 1.0  # llama-cpp-python passes yarn_attn_factor = 1
    if ext:
        attn = (0.1 * math.log(1 / freq_scale) + 1) / (1 + 0.1 * math.log(1 / freq_scale))
    attn *= kv.get(f"{arch}.rope.scaling.attn_factor", 1.0)
    i = np.arange(0, n_rot, 2)
    theta_extrap = base ** (-i / n_rot)
    if "rope_freqs" in tensors:
        theta_extrap = theta_extrap / tensors["rope_freqs"]
    if kind == "longrope":
        theta_extrap = theta_extrap / tensors["rope_factors_long" if n_ctx > orig else "rope_factors_short"]
    theta_interp = freq_scale * theta_extrap
    theta, mscale = theta_interp, attn
    if ext:
        def corr_dim(n_rot_beta: float) -> float:
            return n_rot * math.log(orig / (n_rot_beta * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(0.0, math.floor(corr_dim(32))), min(n_rot - 1.0, math.ceil(corr_dim(1)))
        y = (i / 2 - low) / max(0.001, high - low)
        ramp = (1 - np.clip(y, 0, 1)) * ext
        theta = theta_interp * (1 - ramp) + theta_extrap * ramp
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    return theta, mscale


def read(path) -> tuple[dict, dict, dict]:
    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name.rsplit(".", 1)[0]: np.array(t.data) for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return kv, tensors, types


@pytest.fixture(scope="module")
def stories(stories_path):
    model = longctx.load(stories_path)
    return model


@pytest.mark.parametrize("method,params", [
    ("pi", {}), ("ntk", {}), ("yarn", {}), ("yarn", {"attention_factor": 1.3}),
    ("yarn", {"beta_fast": 16.0, "beta_slow": 2.0}), ("longrope", {}),
])
def test_rope_metadata_gives_transformers_frequencies(stories, stories_path, tmp_path, method, params):
    out = tmp_path / "m.gguf"
    result = longctx.export(stories_path, out, method, target_length=4096, gguf_type="f32", progress=False, **params)
    kv, tensors, _ = read(out)
    with longctx.patched(stories, method, target_length=4096, **params):
        rope, inv_freq, attention, base = rope_inputs(stories)
    theta, mscale = llama_cpp_rope(kv, tensors, n_rot=8, n_ctx=4096)
    if method == "longrope":  # transformers' initial frequencies are the short ones; past L it uses the long ones
        np.testing.assert_allclose(llama_cpp_rope(kv, tensors, n_rot=8, n_ctx=512)[0], inv_freq, rtol=2e-6)
        inv_freq = base / np.asarray(rope["long_factor"])
    np.testing.assert_allclose(theta, inv_freq, rtol=2e-6)
    assert mscale == pytest.approx(attention, rel=1e-6)
    assert kv["llama.context_length"] == 4096 and result.form == "gguf"
    assert result.config["llama.rope.scaling.type"] == {"pi": "linear", "ntk": "none", "longrope": "longrope"}.get(
        method, "none" if "beta_fast" in params else "yarn")
    card = out.with_name(out.name + ".md").read_text()
    assert "llama-server -m PATH.gguf -c 4096" in card and "num_ctx 4096" in card


def test_weights_round_trip_and_types(stories, stories_path, tmp_path):
    """f32 holds the weights exactly (q / k rows in llama.cpp's interleaved layout); f16 and q8_0 are typed as asked,
    norms stay f32; the tied embedding is written once."""
    paths = {}
    for kind in ("f32", "f16", "q8_0"):
        paths[kind] = tmp_path / f"{kind}.gguf"
        longctx.export(stories_path, paths[kind], "yarn", target_length=2048, gguf_type=kind, progress=False)
    _, tensors, types = read(paths["f32"])
    sd = stories.state_dict()
    q = sd["model.layers.0.self_attn.q_proj.weight"].numpy()
    interleaved = q.reshape(8, 2, 4, 64).swapaxes(1, 2).reshape(64, 64)
    np.testing.assert_array_equal(tensors["blk.0.attn_q"], interleaved)
    np.testing.assert_array_equal(tensors["token_embd"], sd["model.embed_tokens.weight"].numpy())
    assert "output" not in tensors and set(types.values()) == {"F32"}
    _, _, t16 = read(paths["f16"])
    assert t16["blk.0.attn_q.weight"] == "F16" and t16["blk.0.attn_norm.weight"] == "F32"
    _, t8tensors, t8 = read(paths["q8_0"])
    assert t8["blk.0.attn_q.weight"] == "Q8_0" and t8["blk.0.ffn_down.weight"] == "F32"  # 172 columns: not blockable
    assert paths["q8_0"].stat().st_size < paths["f16"].stat().st_size < paths["f32"].stat().st_size


def test_gguf_source_copied_with_new_rope(stories_path, tmp_path):
    """A .gguf source keeps every tensor as it is (bytes) and every key but the rope ones, which are replaced."""
    base = tmp_path / "base.gguf"
    longctx.export(stories_path, base, "selfextend", group_size=2, window=64, gguf_type="q8_0", progress=False)
    out = tmp_path / "yarn.gguf"
    result = longctx.export(base, out, "yarn", target_length=4096, progress=False)
    kv0, t0, ty0 = read(base)
    kv1, t1, ty1 = read(out)
    assert ty0 == ty1 and all(np.array_equal(t0[k], t1[k]) for k in t0)
    assert kv1["llama.rope.scaling.type"] == "yarn" and kv1["llama.rope.scaling.factor"] == 8.0
    assert kv1["llama.context_length"] == 4096 and result.config["gguf_type"] == "as the source"
    assert kv1["llama.rope.freq_base"] == 10000.0 and "llama.rope.scaling.attn_factor" in kv1
    assert [k for k in kv0 if k.startswith("tokenizer.")] == [k for k in kv1 if k.startswith("tokenizer.")]


def test_selfextend_is_the_base_file_with_llama_cpp_line(stories_path, tmp_path):
    out = tmp_path / "se.gguf"
    result = longctx.export(stories_path, out, "selfextend", group_size=4, window=128, progress=False)
    kv, tensors, _ = read(out)
    assert kv["llama.rope.scaling.type"] == "none" and kv["llama.context_length"] == 512
    assert not [t for t in tensors if t.startswith("rope")]
    assert any("--grp-attn-n 4 --grp-attn-w 128" in n for n in result.notes)
    assert "--grp-attn-n 4" in out.with_name(out.name + ".md").read_text()


@pytest.mark.parametrize("method,says", [("dca", "does not run dca"), ("dynamic_ntk", "no dynamic NTK"),
                                         ("rerope", "does not run rerope")])
def test_no_gguf_form_refused_and_nothing_written(stories_path, tmp_path, method, says):
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match=says):
        longctx.export(stories_path, out, method, target_length=2048, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_gguf_arguments(stories_path, tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        longctx.export(stories_path, tmp_path / "x.gguf", "yarn", target_length=2048)
    assert (tmp_path / "x.gguf").read_bytes() == b"old"
    with pytest.raises(ValueError, match="gguf_type must be one of"):
        longctx.export(stories_path, tmp_path / "y.gguf", "yarn", target_length=2048, gguf_type="q4_0")
    with pytest.raises(ValueError, match=r"\.gguf output only"):
        longctx.export(stories_path, tmp_path / "dir", "yarn", target_length=2048, gguf_type="f16")
    with pytest.raises(NotStandard, match="dynamic"):
        gguf_rope({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, None, 1.0, None, 512)


@pytest.mark.parametrize("args,says", [
    (["--gguf-type", "q4"], "--gguf-type must be one of f32, f16, q8_0"),
    (["--eval"], "--eval runs on a Hugging Face export"),
    (["--config-for", "vllm"], "--config-for applies to a Hugging Face export"),
])
def test_cli_refuses_in_one_line(stories_path, tmp_path, args, says):
    result = CliRunner().invoke(app, ["export", str(stories_path), str(tmp_path / "o.gguf"), "--method", "yarn",
                                      "--target-length", "2048", *args])
    assert result.exit_code == 2 and says in result.output and not list(tmp_path.iterdir())


def test_cli_writes_gguf(stories_path, tmp_path):
    out = tmp_path / "o.gguf"
    result = CliRunner().invoke(app, ["export", str(stories_path), str(out), "--method", "pi", "--target-length",
                                      "2048", "--gguf-type", "f16"])
    assert result.exit_code == 0, result.output
    assert "gguf form" in result.output and read(out)[0]["llama.rope.scaling.factor"] == 4.0
