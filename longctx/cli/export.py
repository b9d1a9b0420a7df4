"""``longctx export SRC OUT --method M …``: write an extended checkpoint (see ``longctx.export``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import app, console, fail, method_params, methods_list, model_spec


@app.command("export")
def export_cmd(
    src: Annotated[str, typer.Argument(help="Model directory (config.json), sentence-transformers directory "
                                            "(modules.json), a .gguf file, or 'smollm2' / 'minilm'.")],
    out: Annotated[Path, typer.Argument(help="Output directory (written atomically), or a file ending in .gguf: a "
                                             "GGUF for llama.cpp / Ollama (rope metadata llama.cpp reads).")],
    method: Annotated[Optional[str], typer.Option(help="Method to export with (see 'longctx methods'); none for a "
                                                       "checkpoint its method's authors released (e.g. CLEX), which "
                                                       "carries its own.")] = None,
    target_length: Annotated[Optional[int], typer.Option(help="Context length to extend to.")] = None,
    factor: Annotated[Optional[float], typer.Option(help="Extension factor (instead of --target-length).")] = None,
    param: Annotated[Optional[list[str]], typer.Option(help="Method parameter NAME=VALUE, repeatable (e.g. "
                                                            "group_size=16).")] = None,
    verify: Annotated[bool, typer.Option(help="Reload the export, compare its outputs with the patched model "
                                              "(must agree) and run one passkey check at the target length.")] = False,
    eval_: Annotated[bool, typer.Option("--eval", help="Passkey at the trained and the target length on the "
                                                       "reloaded export (decoders: 3 depths by generation; "
                                                       "embedding models: retrieval over 8 documents), into the "
                                                       "model card.")] = False,
    config_for: Annotated[str, typer.Option(help="Where one config.json cannot be read the same by every runtime "
                                                 "(yarn: transformers <= 4.50, vLLM >= 0.30 and SGLang count "
                                                 "max_position_embeddings differently), the reading to write: "
                                                 "'transformers' (every transformers release, vLLM 0.12-0.29), "
                                                 "'vllm' (every vLLM release, transformers >= 4.51) or 'sglang' "
                                                 "(SGLang, vLLM, transformers >= 4.51). The card says which "
                                                 "runtimes read the export as meant.")] = "transformers",
    gguf_type: Annotated[Optional[str], typer.Option(help="For OUT.gguf: tensor type f32, f16 or q8_0 (default: f16 "
                                                          "from a Hugging Face model, the source's own types from a "
                                                          ".gguf).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists (once the new export is complete; the "
                                                 "previous one is never lost).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Write an extended checkpoint in the form its method declares — a standard config (loads extended in plain
    transformers and vLLM), a longctx block that longctx.load re-applies, or new weights — plus a model card
    (README.md). 'longctx methods' says which methods a standard config expresses."""
    # the whole command is checked before any work
    model_spec(src)
    if method is not None:
        method = methods_list(method, "--method", ())[0]
    lengths = {k: v for k, v in (("target_length", target_length), ("factor", factor)) if v is not None}
    if method is None and (param or lengths):
        fail("--param / --target-length / --factor need --method (only a released checkpoint exports without one)")
    params = method_params(param, None, default_method=method, fixed=lengths).get(method, {}) if method else {}
    if method is not None:
        from longctx.patches import get_method

        try:
            get_method(method).make_config(**params, **lengths)
        except (TypeError, ValueError) as e:
            fail(str(e))
    from longctx.export.forms import CONFIG_FOR

    if config_for not in CONFIG_FOR:
        fail(f"--config-for must be one of {', '.join(CONFIG_FOR)}, got '{config_for}'")
    is_gguf = out.suffix == ".gguf"
    if gguf_type is not None and not is_gguf:
        fail("--gguf-type applies to a .gguf output only (OUT ending in .gguf)")
    from longctx.export.gguf import GGUF_TYPES

    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        fail(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got '{gguf_type}'")
    if is_gguf:
        if eval_:
            fail("--eval runs on a Hugging Face export; a .gguf checks with --verify (llama.cpp's logits)")
        if config_for != "transformers":
            fail("--config-for applies to a Hugging Face export; a .gguf carries llama.cpp's own rope keys")
        if verify and importlib.util.find_spec("llama_cpp") is None:
            fail("--verify of a .gguf runs llama.cpp: pip install llama-cpp-python (it builds llama.cpp, minutes)")
        if out.is_dir() or (out.exists() and not overwrite):
            fail(f"{out} is a directory" if out.is_dir() else f"{out} exists; pass --overwrite to replace it")
    elif out.exists() and (not out.is_dir() or not overwrite):
        fail(f"{out} exists; pass --overwrite to replace it" if out.is_dir() else f"{out} exists and is not a "
             "directory")

    import longctx
    from longctx.eval.export_checks import export_checks

    from longctx.export import ExportError

    try:
        checks = () if is_gguf else export_checks(verify=verify, eval=eval_)
        result = longctx.export(src, out, method, overwrite=overwrite, verify=verify, config_for=config_for,
                                gguf_type=gguf_type, checks=checks, **params, **lengths)
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as e:
        fail(" ".join(str(e).split()))
    except ExportError as e:  # verification failed: nothing was written
        typer.echo(f"verify: FAILED — {' '.join(str(e).split())}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    if result.verify:
        typer.echo(verdict(result))  # one line, unwrapped, before any detail
    console.print(f"[bold]{result.path}[/]: {result.method} ({result.form} form), trained {result.trained_length} "
                  f"-> target {result.target_length}, in {result.seconds:.1f} s")
    for note in result.notes:
        console.print(f"  - {note}")
    for report in result.checks.values():
        console.print("\n".join([f"  {report['title']}:"] + [f"  {line}" for line in report["lines"]]))


def verdict(result) -> str:
    """The one line ``--verify`` answers with, before any detail."""
    v = result.verify
    if result.form == "gguf":
        return (f"verify: PASSED — llama.cpp runs the written GGUF as the patched model (max |diff| "
                f"{v['max_abs_diff']:.3g} over {v['tokens']} tokens, top-1 agreement {v['top1_agreement']:.1%})")
    line = (f"verify: PASSED — the reloaded export gives the patched model's outputs (max |diff| "
            f"{v['max_abs_diff']:.3g} over {v['tokens']} tokens)")
    rows = result.checks.get("verify_passkey", {}).get("data")
    if rows and rows[0]["kind"] == "generation":
        line += f"; passkey at the target length: {sum(r['correct'] for r in rows)}/{len(rows)} found"
    elif rows:
        line += f"; passkey retrieval at the target length: nDCG@1 {rows[0]['ndcg@1']:.2f}"
    elif rows is not None:
        line += "; no tokenizer: no passkey run"
    return line
