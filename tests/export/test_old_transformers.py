"""An old transformers release reads longctx's exports as longctx means them (issue: exports every runtime reads).

transformers 4.46.3, in a virtualenv made once from the package index (``bench/export_compat.py``: kept in
``$LONGCTX_COMPAT_CACHE`` or ``~/.cache/longctx/compat``), loads stories260K exported with yarn and pi — and the
``save_pretrained`` copies of the patched models — with plain ``AutoModelForCausalLM.from_pretrained``; its logits
must equal the model longctx patched in memory. The export written for vLLM's reading of yarn is the one that
release reads wrongly (as the card says): the check sees the difference.
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO

RELEASE = "4.46.3"


def _bench():
    spec = importlib.util.spec_from_file_location("export_compat", REPO / "bench" / "export_compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def old_python():
    return _bench().venv_python(RELEASE, log=lambda *_: None)


def test_transformers_4_46_reads_yarn_and_pi_exports_and_saves_as_longctx_means_them(tmp_path, old_python,
                                                                                     stories_path):
    bench = _bench()
    todo = [c for c in bench.cases(["yarn", "pi", "longrope"], factor=8.0)]
    jobs = bench.write_cases(tmp_path, todo, length=4096)
    rows = {r["case"]: r for r in bench.read_with(old_python, jobs)}
    assert all(r["transformers"] == RELEASE for r in rows.values())
    for name in ("yarn export", "yarn save_pretrained", "pi export", "pi save_pretrained", "longrope export",
                 "longrope save_pretrained"):
        assert "error" not in rows[name], rows[name]
        assert rows[name]["max_abs_diff"] < 1e-4, (name, rows[name]["max_abs_diff"])
    # yarn 8x on head dim 8: the frequencies every release reads (the ramp over the trained length 512)
    assert rows["yarn export"]["inv_freq"] == pytest.approx([1.0, 0.05625, 0.00125, 0.000125], rel=1e-5)
    assert rows["yarn export"]["attention_scaling"] == pytest.approx(0.1 * 2.0794415 + 1, rel=1e-6)
    # the vLLM reading: 4.46 takes max_position_embeddings (the target) as the trained length
    wrong = rows["yarn export (vllm)"]
    assert wrong["inv_freq"][1] == pytest.approx(0.1, rel=1e-5) and wrong["max_abs_diff"] > 1.0
    assert "pi export (vllm)" not in rows  # pi has one reading: the same config was written
    # and 4.x reads them without a word: no key in rope_scaling it does not know (rope_theta went top level only)
    import subprocess

    for case in jobs["cases"]:
        if any(m in case["name"] for m in ("yarn", "pi", "longrope")) and "vllm" not in case["name"]:  # (vLLM's own)
            done = subprocess.run([str(old_python), "-c", "import sys; from transformers import AutoConfig; "
                                   "AutoConfig.from_pretrained(sys.argv[1])", case["dir"]],
                                  capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
            assert done.returncode == 0, done.stderr[-500:]
            assert "Unrecognized keys" not in done.stderr, (case["name"], done.stderr[-500:])


def test_transformers_4_46_reads_gpt_neox_exports_under_its_own_names(tmp_path, old_python):
    """A GPT-NeoX checkpoint as 4.x wrote it (``rotary_pct``, ``rotary_emb_base``): 4.x reads θ and the rotary
    fraction only under those names, so an ntk export (a new θ) and every save_pretrained copy (transformers 5 keeps
    them in rope_parameters only) must write them there too."""
    bench = _bench()
    todo = bench.cases(["ntk", "pi"], factor=8.0)
    jobs = bench.write_cases(tmp_path, todo, length=512, family="gpt_neox", maker=RELEASE)
    rows = bench.read_with(old_python, jobs)
    assert [r["case"] for r in rows] == ["base (no patch)", "ntk export", "ntk save_pretrained", "pi export",
                                         "pi save_pretrained"]
    for row in rows:
        assert "error" not in row and row["max_abs_diff"] < 1e-4, row
