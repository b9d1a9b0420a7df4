"""The runnable examples of the method pages (``docs/methods/*.md``: a ``python`` block that imports what it uses)
run as printed, from the repository root with ``../shared/`` beside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import SHARED

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = [(page.stem, block) for page in sorted((ROOT / "docs" / "methods").glob("*.md"))
          for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S) if block.startswith("import ")]


def test_the_new_method_pages_have_runnable_examples():
    assert {"dca", "rerope", "string", "longrope"} <= {name for name, _ in BLOCKS}


@pytest.mark.parametrize("name, block", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_runnable_example_runs_as_printed(name, block, capsys, monkeypatch):
    if not (SHARED / "models" / "stories260K").exists():
        pytest.skip("../shared/models/stories260K missing (shared/ is laid out beside the repo in CI)")
    monkeypatch.chdir(ROOT)
    exec(compile(block, f"docs/methods/{name}.md", "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    target = {"string": 638}.get(name, 4096)  # STRING's page stays inside its reach L + S - W (S = 168, W = 42)
    assert f"longctx: {name} applied: trained 512 -> target {target}" in printed, printed
