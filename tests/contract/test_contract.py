"""The method contract, tested once over the whole registry (peft's ``testing_common`` style).

Every registered method × each of its examples (``Method.examples``: one per variant) × each model family its kind
applies to gets every check below — a new method gets them by registering. The life of a patched model:

* patch then unpatch: outputs, state dict, buffers, config (the very object), generation config, attention
  implementation, hooks and module attributes, tokenizer / sentence-transformers limits — bit for bit as before;
* a failed patch (the method fails after making its edits), or a failed re-patch of a patched model, leaves the
  model exactly as it was (its earlier patch too);
* every parameter validated at patch time: non-finite, negative, zero, fractional where an integer is needed, a
  string outside its choices → ``ValueError`` naming the parameter and what is allowed; nothing changed;
* ``copy.deepcopy``: an independent patched model; unpatching or deleting it does not touch the original;
* ``save_pretrained`` (sentence-transformers: ``save``): ``longctx.load`` gives the patched outputs; a standard form
  loads patched in plain transformers, the longctx form as the base model; no saved config holds a rope type plain
  transformers cannot read;
* ``torch.save`` / pickle: loads back patched, with the same outputs, and unpatches on its own;
* two models sharing one config object: patching one changes nothing in the other;
* ``.to(dtype)`` after a patch: rotary frequencies stay fp32; unpatch restores what the never-patched model would
  hold after the same cast;
* the patch's state is freed with the model.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import io
import json
import math
import weakref
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import IMAGE, TRAINED, build, build_bert, build_sentence_transformer, build_vlm, word_tokenizer

import longctx
from longctx.models import find_rotary_modules, unwrap
from longctx.patches import registry
from longctx.patches.base import STATE_ATTR

# the model families each kind of method is checked on: decoders (GQA, per-layer-type rope, partial rotary), a RoPE
# encoder, sentence-transformers wrappers, a vision-language model, a BERT
FAMILIES = {
    "rope": ["llama", "gemma3_text", "gpt_neox", "modernbert", "st-modernbert"],
    "rope_attention": ["llama", "gemma3_text", "gpt_neox", "modernbert", "st-modernbert"],
    "rope_positions": ["llava"],
    "absolute": ["bert", "st-bert"],
}
ENCODER_FAMILIES = {"modernbert", "st-modernbert", "bert", "st-bert"}
CASES = [pytest.param(name, i, family, id=f"{name}[{i}]-{family}")
         for name, spec in registry.items() for i, _ in enumerate(spec.examples(TRAINED))
         for family in FAMILIES[spec.kind] if not (spec.decoders_only and family in ENCODER_FAMILIES)]
BUILT_IN_ROPE_TYPES = {"default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional"}


@dataclass
class Subject:
    """The model a method is checked on: what to patch, its transformers model, how to run it."""

    family: str
    model: Any
    folder: Any = None

    @property
    def hf(self) -> torch.nn.Module:
        return unwrap(self.model)

    @property
    def is_st(self) -> bool:
        return self.model is not self.hf


def make(family: str, tmp_path) -> Subject:
    if family == "bert":
        return Subject(family, build_bert())
    if family == "llava":
        return Subject(family, build_vlm("llava"))
    if family.startswith("st-"):
        inner = build_bert() if family == "st-bert" else build(family[3:])
        return Subject(family, build_sentence_transformer(inner, tmp_path / "st-source"))
    return Subject(family, build(family))


def _ids(batch: int = 2, n: int = 2 * TRAINED + 5) -> torch.Tensor:
    return torch.randint(4, 100, (batch, n), generator=torch.Generator().manual_seed(1))


TEXTS = [" ".join(f"w{(7 * i + j) % 100}" for i in range(2 * TRAINED + 5)) for j in range(2)]


def outputs(subject: Subject, model: Any = None) -> torch.Tensor:
    """The model's outputs on inputs past the trained length (embeddings for sentence-transformers)."""
    model = subject.model if model is None else model
    with torch.no_grad():
        if subject.is_st:
            return model.encode(TEXTS, convert_to_tensor=True).float()
        hf = unwrap(model)
        if subject.family == "llava":
            ids = torch.tensor([[5] * 10 + [IMAGE] * 16 + list(range(20, 60))] * 2)
            pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)).to(hf.dtype)
            return hf(input_ids=ids, pixel_values=pixels).logits.float()
        # an unpatched learned position table reads at most TRAINED positions
        short = subject.family == "bert" and not longctx.is_patched(hf)
        ids = _ids(n=TRAINED) if short else _ids()
        out = hf(input_ids=ids, attention_mask=torch.ones_like(ids))
        return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def _example(name: str, index: int) -> dict[str, Any]:
    return dict(registry[name].examples(TRAINED)[index])


def snapshot(subject: Subject, tokenizer: Any = None) -> dict[str, Any]:
    """Everything unpatch must restore."""
    hf = subject.hf
    modules = dict(hf.named_modules())
    return {
        "outputs": outputs(subject),
        "state_dict": {k: v.clone() for k, v in hf.state_dict().items()},
        "buffers": {k: (v.clone(), v.dtype, v.device) for k, v in hf.named_buffers()},
        "config_ids": {name: id(m.__dict__["config"]) for name, m in modules.items() if "config" in m.__dict__},
        "config": json.dumps(hf.config.to_dict(), sort_keys=True, default=str),
        "attn": hf.config._attn_implementation,
        "generation": (json.dumps(hf.generation_config.to_dict(), sort_keys=True, default=str)
                       if getattr(hf, "generation_config", None) is not None else None),
        "hooks": {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in modules.items()},
        "attrs": {name: sorted(k for k in vars(m) if not k.startswith("__")) for name, m in modules.items()},
        "limits": (getattr(tokenizer, "model_max_length", None), getattr(subject.model, "max_seq_length", None),
                   getattr(getattr(subject.model, "tokenizer", None), "model_max_length", None)),
        "patched": longctx.is_patched(subject.model),
    }


def assert_same(before: dict, after: dict) -> None:
    assert torch.equal(before["outputs"], after["outputs"]), "outputs differ"
    assert before["state_dict"].keys() == after["state_dict"].keys()
    for k, v in before["state_dict"].items():
        assert torch.equal(v, after["state_dict"][k]), k
    assert before["buffers"].keys() == after["buffers"].keys()
    for k, (v, dtype, device) in before["buffers"].items():
        w, dtype2, device2 = after["buffers"][k]
        assert dtype == dtype2 and device == device2 and torch.equal(v, w), k
    for key in ("config_ids", "config", "attn", "generation", "hooks", "attrs", "limits", "patched"):
        assert before[key] == after[key], key


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, index, family", CASES)
def test_unpatch_restores_everything(name, index, family, tmp_path):
    subject = make(family, tmp_path)
    tokenizer = word_tokenizer()
    before = snapshot(subject, tokenizer)
    info = longctx.patch(subject.model, name, tokenizer=tokenizer, **_example(name, index))
    assert longctx.is_patched(subject.model) and longctx.patch_info(subject.model) is info
    changed = outputs(subject)
    assert not torch.equal(changed, before["outputs"]), f"{name} did not change the outputs of {family}"
    if info.target_length:
        assert tokenizer.model_max_length == info.target_length
    assert longctx.unpatch(subject.model)
    assert_same(before, snapshot(subject, tokenizer))
    assert longctx.unpatch(subject.model) is False


@pytest.mark.parametrize("name, index, family", CASES)
def test_failed_patch_changes_nothing(name, index, family, tmp_path, monkeypatch):
    """The method makes its edits, then fails: every edit is taken back."""
    subject = make(family, tmp_path)
    tokenizer = word_tokenizer()
    before = snapshot(subject, tokenizer)
    spec = registry[name]

    def failing(model, cfg, undo):
        spec.apply(model, cfg, undo)
        raise RuntimeError("injected failure after the method's edits")

    monkeypatch.setitem(registry, name, dataclasses.replace(spec, apply=failing))
    with pytest.raises(RuntimeError, match="injected"):
        longctx.patch(subject.model, name, tokenizer=tokenizer, **_example(name, index))
    assert_same(before, snapshot(subject, tokenizer))


@pytest.mark.parametrize("name, index, family", CASES)
def test_failed_repatch_keeps_the_earlier_patch(name, index, family, tmp_path):
    """Patched with the method, then re-patched with each method that takes a target length, asking for one shorter
    than the trained length (refused only once the model is known): the earlier patch stays, exactly."""
    subject = make(family, tmp_path)
    tokenizer = word_tokenizer()
    info = longctx.patch(subject.model, name, tokenizer=tokenizer, **_example(name, index))
    before = snapshot(subject, tokenizer)
    absolute = registry[name].kind == "absolute"
    encoder = family in ENCODER_FAMILIES
    others = [m.name for m in registry.values() if "target_length" in m.parameter_help()
              and (m.kind == "absolute") == absolute and not (m.decoders_only and encoder)]
    assert others
    for other in others:
        with pytest.raises(ValueError):
            longctx.patch(subject.model, other, tokenizer=tokenizer, target_length=TRAINED // 2)
        # applied again: the same content, in new config copies
        assert_same(before | {"config_ids": None}, snapshot(subject, tokenizer) | {"config_ids": None})
        assert longctx.patch_info(subject.model) == info


NEVER_ALLOWED = [float("nan"), float("inf"), float("-inf"), -3, [1]]


@pytest.mark.parametrize("name", list(registry))
def test_every_parameter_is_validated(name, tmp_path):
    """Hostile values for every parameter: a ValueError naming the parameter and what is allowed, before any
    change (the checks run on the config, so one model serves every method)."""
    spec = registry[name]
    subject = make(FAMILIES[spec.kind][0], tmp_path)
    before = snapshot(subject)
    example = _example(name, 0)
    checks = spec.config.checks()
    assert checks, f"{name} declares no validated parameter"
    for param, check in checks.items():
        bad = list(NEVER_ALLOWED)
        if check.kind is tuple:  # a list of numbers: [1] may be one; lists of bad numbers are not
            bad = [float("nan"), float("inf"), -3, 2.0, "abc", True, [], [float("nan")], [float("inf")], [-3.0],
                   [True], ["x"], [[1.0]]]
        elif check.kind in (int, float):
            bad += [True, "abc"]
            if not (check.ge is not None and check.ge <= 0):
                bad.append(0)
            if check.kind is int:
                bad.append(4.5)
        elif check.kind is bool:
            bad += ["yes", 1, 0.0]
        elif check.choices:
            bad += ["bogus", 3]
        else:
            bad += [3, True]
        for value in bad:
            with pytest.raises(ValueError, match=rf"{name}: {param} must be .+, got"):
                longctx.patch(subject.model, name, **{**example, param: value})
    assert_same(before, snapshot(subject))


@pytest.mark.parametrize("name, index, family", CASES)
def test_deepcopy_is_an_independent_patched_model(name, index, family, tmp_path):
    subject = make(family, tmp_path)
    original = outputs(subject)
    longctx.patch(subject.model, name, **_example(name, index))
    patched = outputs(subject)
    clone = copy.deepcopy(subject.model)
    assert longctx.is_patched(clone) and torch.equal(outputs(subject, clone), patched)
    assert longctx.unpatch(clone)
    assert torch.equal(outputs(subject, clone), original)
    assert longctx.is_patched(subject.model) and torch.equal(outputs(subject), patched)
    second = copy.deepcopy(subject.model)
    del clone, second
    gc.collect()
    assert torch.equal(outputs(subject), patched)
    kept = copy.deepcopy(subject.model)
    longctx.unpatch(subject.model)
    assert torch.equal(outputs(subject), original)
    assert torch.equal(outputs(subject, kept), patched)  # the copy stays patched


def _rope_types(config: dict) -> set[str]:
    found = set()
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key) or {}
        for params in ([rope] if "rope_type" in rope or "type" in rope else
                       [v for v in rope.values() if isinstance(v, dict)]):
            found.add(params.get("rope_type", params.get("type", "default")))
    for sub in ("text_config",):
        if isinstance(config.get(sub), dict):
            found |= _rope_types(config[sub])
    return found


@pytest.mark.parametrize("name, index, family", CASES)
def test_save_pretrained_round_trip(name, index, family, tmp_path):
    subject = make(family, tmp_path)
    original = outputs(subject)
    info = longctx.patch(subject.model, name, **_example(name, index))
    patched = outputs(subject)
    folder = tmp_path / "saved"
    if subject.is_st:
        subject.model.save(str(folder))
    else:
        subject.hf.save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    assert _rope_types(config) <= BUILT_IN_ROPE_TYPES, _rope_types(config)
    loaded = longctx.load(folder)
    torch.testing.assert_close(outputs(subject, loaded), patched, atol=1e-5, rtol=0)
    form = registry[name].form(info.params)
    assert config["longctx"]["method"] == name and config["longctx"]["form"] == form
    if not subject.is_st and form != "weights":  # plain transformers: patched (standard form) or the base model
        plain = type(subject.hf).from_pretrained(folder).eval()
        expected = patched if form == "config" else original
        torch.testing.assert_close(outputs(subject, plain), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, index, family", CASES)
def test_pickle_round_trip(name, index, family, tmp_path):
    subject = make(family, tmp_path)
    original = outputs(subject)
    unpatched = copy.deepcopy(subject.model)
    longctx.patch(subject.model, name, **_example(name, index))
    patched = outputs(subject)
    try:  # some models cannot be pickled at all (Llava holds a local hook of transformers'): the same error then
        torch.save(copy.deepcopy(unpatched), io.BytesIO())
    except Exception as e:  # noqa: BLE001
        with pytest.raises(type(e), match=str(e)[:40]):
            torch.save(subject.model, io.BytesIO())
        return
    buffer = io.BytesIO()
    torch.save(subject.model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert longctx.is_patched(loaded) and torch.equal(outputs(subject, loaded), patched)
    longctx.unpatch(loaded)
    assert torch.equal(outputs(subject, loaded), original)
    assert torch.equal(outputs(subject), patched)


@pytest.mark.parametrize("name, index, family", [c for c in CASES if not c.values[2].startswith("st-")])
def test_a_shared_config_is_not_touched(name, index, family, tmp_path):
    """Two models built from one config object: patching one changes nothing in the other."""
    subject = make(family, tmp_path)
    hf = subject.hf
    twin = type(hf)(hf.config).eval()
    twin.load_state_dict(hf.state_dict())
    twin_subject = Subject(family, twin)
    before = snapshot(twin_subject)
    shared = hf.config
    longctx.patch(subject.model, name, **_example(name, index))
    assert twin.config is shared
    assert_same(before, snapshot(twin_subject))
    longctx.unpatch(subject.model)
    assert hf.config is shared


@pytest.mark.parametrize("name, index, family", CASES)
def test_cast_keeps_fp32_frequencies_and_unpatch_follows_it(name, index, family, tmp_path):
    subject = make(family, tmp_path)
    reference = copy.deepcopy(subject.model)  # never patched, cast the same way
    longctx.patch(subject.model, name, **_example(name, index))
    subject.model.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    for rotary in find_rotary_modules(subject.hf):
        for buf_name, buf in rotary.module.named_buffers(recurse=False):
            if buf_name.endswith("inv_freq"):
                assert buf.dtype == torch.float32, (rotary.name, buf_name)
    out = outputs(subject)
    assert torch.isfinite(out).all()
    longctx.unpatch(subject.model)
    ref = Subject(family, reference)
    assert_same(snapshot(ref) | {"config_ids": None, "attrs": None},
                snapshot(subject) | {"config_ids": None, "attrs": None})


@pytest.mark.parametrize("name, index, family", CASES)
def test_state_is_freed_with_the_model(name, index, family, tmp_path):
    subject = make(family, tmp_path)
    longctx.patch(subject.model, name, **_example(name, index))
    outputs(subject)
    model_ref = weakref.ref(subject.hf)
    state_ref = weakref.ref(getattr(subject.hf, STATE_ATTR))
    subject = None
    gc.collect()
    assert model_ref() is None and state_ref() is None


def test_every_registered_method_is_in_the_battery():
    assert {c.values[0] for c in CASES} == set(registry)
    assert all(math.isfinite(len(spec.examples(TRAINED))) and spec.examples(TRAINED) for spec in registry.values())


@pytest.mark.parametrize("name, index, family", [c for c in CASES if registry[c.values[0]].unchanged_within])
def test_unchanged_within_the_trained_length_is_bit_exact(name, index, family, tmp_path):
    """A method declaring ``unchanged_within`` gives the unpatched outputs bit for bit on inputs no longer than the
    trained length (special tokens included): the retrieval eval shares those embeddings across methods."""
    subject = make(family, tmp_path)
    ids = _ids(n=TRAINED)  # a BERT's trained length counts its position table rows: the longest input it reads
    texts = [" ".join(f"w{(7 * i + j) % 100}" for i in range(n)) for j, n in enumerate((TRAINED - 2, 5))]

    def run() -> torch.Tensor:
        with torch.no_grad():
            if subject.is_st:
                return subject.model.encode(texts, convert_to_tensor=True).float()
            out = subject.hf(input_ids=ids, attention_mask=torch.ones_like(ids))
            return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()

    if subject.is_st:
        subject.model.max_seq_length = TRAINED
        assert len(subject.model.tokenizer(texts[0]).input_ids) == TRAINED  # specials included: exactly L
    before = run()
    longctx.patch(subject.model, name, **_example(name, index))
    assert torch.equal(run(), before)
