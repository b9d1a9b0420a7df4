"""The model card (README.md) of an export: base model, method and parameters, lengths, how to load it, and the
reports of the checks that ran (verification, and any evaluation the caller handed in)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["model_card", "write_card"]

FORMS = {
    "config": "standard config (loads in plain transformers, vLLM and SGLang without longctx)",
    "longctx": "longctx block in config.json (re-applied by `longctx.load`; plain transformers loads the base model)",
    "weights": "interpolated position table written into the weights (loads at the new length anywhere; "
               "`longctx.load` restores the anchor mapping)",
    "gguf": "GGUF file for llama.cpp (and the tools built on it: Ollama, LM Studio, llama-cpp-python), the extension "
            "in its rope metadata",
}


def write_card(partial: Path, result: Any) -> None:
    (partial / "README.md").write_text(model_card(result, is_st=(partial / "modules.json").exists()))


def model_card(result: Any, is_st: bool = False) -> str:
    """The README.md of an export (``result``: its :class:`~longctx.export.ExportResult`)."""
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in result.params.items())
    lines = [
        "---", "tags:", "- longctx", "- long-context", f"- {result.method}",
        f"library_name: {'sentence-transformers' if is_st else 'transformers'}", "---", "",
        f"# {Path(result.source).name or result.source} — extended to {result.target_length} tokens with "
        f"{result.method}", "",
        "Written by [longctx](https://pypi.org/project/longctx/) without training.", "",
        f"- base model: `{result.source}`",
        f"- trained length: {result.trained_length}; target length: {result.target_length}",
        f"- form: {FORMS[result.form]}" + (f"; written for the {result.config_for} reading (`config_for`)"
                                            if result.form == "config" else ""), "",
        "| parameter | value |", "|---|---|", params, "",
        "config.json keys set by the export:", "", "```json", json.dumps(result.config, indent=2, default=str), "```",
        "", "## Load", "",
    ]
    if result.form == "gguf":
        ctx = result.target_length
        lines += ["```bash", f"llama-server -m PATH.gguf -c {ctx}", f"llama-cli -m PATH.gguf -c {ctx}", "```", "",
                  "```python", "from llama_cpp import Llama", f"llm = Llama(model_path=\"PATH.gguf\", n_ctx={ctx})",
                  "```", "", "Ollama: a Modelfile with `FROM ./PATH.gguf` and "
                  f"`PARAMETER num_ctx {ctx}`.", ""]
    elif result.form == "config" and not is_st:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(\"PATH\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")", "```", "",
                  "```bash", "# which vLLM / SGLang releases read this config as meant: see Notes",
                  f"vllm serve PATH --max-model-len {result.target_length}",
                  f"python -m sglang.launch_server --model-path PATH --context-length {result.target_length}",
                  "```", "", "llama.cpp / Ollama: `longctx export PATH OUT.gguf` writes a GGUF with llama.cpp's own "
                  "rope keys.", ""]
    if is_st:
        lines += ["```python", "import longctx  # or: from sentence_transformers import SentenceTransformer",
                  "model = longctx.load(\"PATH\")", "```", ""]
    if result.form != "gguf":
        lines += ["```python", "import longctx",
                  "model = longctx.load(\"PATH\")  # the extension active, whatever the form", "```", ""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    if result.verify:
        v = result.verify
        what = ("llama.cpp (llama-cpp-python) on the written file" if result.form == "gguf"
                else "reloaded export")
        top1 = f", top-1 agreement {v['top1_agreement']:.1%}" if "top1_agreement" in v else ""
        lines += ["## Verification (`--verify`)", "",
                  f"- {what} vs patched model in memory, {v['tokens']} tokens ({v.get('text', 'random')}): max |Δ| = "
                  f"{v['max_abs_diff']:.3g} (outputs up to {v['max_abs_output']:.3g}){top1}", ""]
    for report in result.checks.values():
        lines += [f"## {report['title']}", ""] + list(report["lines"]) + [""]
    return "\n".join(lines)
