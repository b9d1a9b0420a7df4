"""Do other transformers releases read longctx's exports as longctx means them?

For every config-form method (the methods whose ``export_form`` is ``"config"``) this writes, from stories260K
(Llama, trained 512), an export (``longctx export``, both ``config_for`` readings where they differ) and a
``save_pretrained`` copy of the patched model; then, in a throwaway virtualenv per transformers release (made with
``--system-site-packages`` so torch is shared; only transformers and what it pins are installed, from the package
index this machine reaches), loads each directory with plain ``AutoModelForCausalLM.from_pretrained`` and compares
its logits on the same random tokens with the model longctx patched in memory (fp32, ``--length`` tokens).

    python bench/export_compat.py                         # every release in RELEASES, table on stdout
    python bench/export_compat.py --releases 4.46.3,4.51.3 --json out.json

The virtualenvs are kept in ``--cache`` (default ``~/.cache/longctx/compat``) and reused. The cell is the largest
|logit difference|; a load that raises shows its error. ``tests/export/test_old_transformers.py`` runs one old release
through the same functions in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RELEASES = ["4.45.2", "4.46.3", "4.47.1", "4.48.3", "4.49.0", "4.50.3", "4.51.3", "4.52.4", "4.53.3", "4.54.1",
            "4.55.4", "4.56.2", "4.57.6", "5.0.0"]
ROOT = Path(__file__).resolve().parents[1]
STORIES = Path(os.environ.get("LONGCTX_SHARED", ROOT.parent / "shared")) / "models" / "stories260K"
CACHE = Path(os.environ.get("LONGCTX_COMPAT_CACHE", "~/.cache/longctx/compat")).expanduser()

# Runs inside the old release's interpreter: load each directory with plain transformers, compare with the reference.
CHILD = r'''
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch, transformers
from transformers import AutoModelForCausalLM
transformers.logging.set_verbosity_error()
jobs = json.loads(sys.stdin.read())
ids = torch.load(jobs["ids"])
for case in jobs["cases"]:
    row = {"case": case["name"], "transformers": transformers.__version__}
    try:
        model = AutoModelForCausalLM.from_pretrained(case["dir"], torch_dtype=torch.float32).eval()
        rotary = next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        ref = torch.load(case["ref"])
        inv_freq = getattr(rotary, "inv_freq", None)
        row.update(max_abs_diff=float((logits - ref).abs().max()),
                   inv_freq=None if inv_freq is None else [float(x) for x in inv_freq.float()],
                   attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)))
    except Exception as e:  # a loud failure is a result too
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
    print(json.dumps(row), flush=True)
'''


def venv_python(release: str, cache: Path = CACHE, log=lambda m: print(m, file=sys.stderr)) -> Path:
    """The interpreter of a virtualenv holding transformers ``release`` (made on first use, reused after), which
    sees this interpreter's packages (torch …) behind its own: a ``.pth`` file names this environment's
    site-packages. (``venv --system-site-packages`` would expose the *base* interpreter's instead, which has no torch
    when this one is itself a virtualenv.) A kept virtualenv is reused only if it was made for this environment and
    still imports torch and the release; otherwise it is made again."""
    import site
    import sysconfig

    folder = cache / f"transformers-{release}"
    python = folder / "bin" / "python"
    # this environment's site-packages, and the ones it sees itself (a virtualenv made with
    # --system-site-packages finds torch in its base interpreter's)
    parent = "\n".join(dict.fromkeys([sysconfig.get_paths()["purelib"], *site.getsitepackages()]))
    stamp = f"{release}\n{parent}\n"
    ready = folder / ".ready"
    if python.exists() and ready.exists() and ready.read_text() == stamp and _imports(python, release):
        return python
    log(f"  making a virtualenv for transformers {release} in {folder} ...")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "_longctx_parent_env.pth").write_text(parent + "\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           f"transformers=={release}"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip could not install transformers=={release} into {folder}:\n{done.stderr[-2000:]}")
    if not _imports(python, release):
        raise RuntimeError(f"{python} does not import torch and transformers {release} after its install")
    ready.write_text(stamp)
    return python


def _imports(python: Path, release: str) -> bool:
    """``python`` imports torch and transformers ``release``."""
    done = subprocess.run([str(python), "-c", "import torch, transformers; print(transformers.__version__)"],
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    return done.returncode == 0 and done.stdout.strip() == release


# tiny models of other families, built from their config (random weights: the logits compare readings, not quality)
FAMILIES = {
    "qwen2": {},
    "gemma3_text": {"head_dim": 8, "num_hidden_layers": 3, "sliding_window": 16,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "gpt_neox": {"rotary_pct": 0.5},
}
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)


MAKER = "4.57.6"  # tiny models are written by the last 4.x release: a config.json as checkpoints on the Hub have it
MAKE = r'''
import json, sys, torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
family, kwargs, folder = json.loads(sys.stdin.read())
torch.manual_seed(0)
AutoModelForCausalLM.from_config(CONFIG_MAPPING[family](**kwargs)).save_pretrained(folder)
'''


def source_model(family: str, work: Path, cache: Path = CACHE, maker: str = MAKER) -> Path:
    """The directory exported from: stories260K, or a tiny random model of ``family`` written under ``work`` by
    transformers ``maker`` (a Hub-era config.json: GPT-NeoX's ``rotary_pct`` / ``rotary_emb_base`` …)."""
    if family == "stories260K":
        return STORIES
    folder = work / f"base-{family}"
    subprocess.run([str(venv_python(maker, cache)), "-c", MAKE], check=True, capture_output=True, text=True,
                   input=json.dumps([family, {**TINY, **FAMILIES[family]}, str(folder)]))
    return folder


def cases(methods: list[str] | None = None, factor: float = 8.0) -> list[dict]:
    """Every config-form method, written by ``longctx export`` (each ``config_for`` reading) and by
    ``save_pretrained`` of the patched model."""
    import longctx
    from longctx.export.forms import CONFIG_FOR
    from longctx.patches import registry

    names = methods or sorted(n for n, spec in registry.items()
                              if spec.kind == "rope" and spec.form({"factor": factor}) == "config")
    out = [{"name": "base (no patch)", "method": None, "source": "base"}]
    for name in names:
        for config_for in CONFIG_FOR:
            out.append({"name": f"{name} export" + ("" if config_for == CONFIG_FOR[0] else f" ({config_for})"),
                        "method": name, "source": "export", "config_for": config_for, "factor": factor})
        out.append({"name": f"{name} save_pretrained", "method": name, "source": "save_pretrained",
                    "factor": factor})
    del longctx
    return out


def write_cases(work: Path, todo: list[dict], length: int, seed: int = 0, family: str = "stories260K",
                cache: Path = CACHE, maker: str = MAKER) -> dict:
    """Write each case's directory and its reference logits (the model patched in memory) under ``work``."""
    import torch
    from transformers import AutoModelForCausalLM

    import longctx

    source = source_model(family, work, cache, maker)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    torch.save(ids, work / "ids.pt")
    jobs = {"ids": str(work / "ids.pt"), "cases": []}
    for i, case in enumerate(todo):
        folder = work / f"case{i}"
        if case["method"] is None:  # the base model as this release reads it: what the others are measured against
            with torch.no_grad():
                torch.save(model(input_ids=ids).logits, work / f"ref{i}.pt")
            jobs["cases"].append({"name": case["name"], "dir": str(source), "ref": str(work / f"ref{i}.pt")})
            continue
        longctx.patch(model, case["method"], factor=case["factor"])
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        if case["source"] == "export":
            longctx.unpatch(model)
            longctx.export(source, folder, case["method"], factor=case["factor"], config_for=case["config_for"],
                           progress=False)
            same = [c for c in jobs["cases"] if c.get("config") == (folder / "config.json").read_text()]
            if same:  # this reading writes the very config another case wrote: nothing more to compare
                case["skip"] = f"{case['name']} writes the same config.json as {same[0]['name']}"
                continue
        else:
            model.save_pretrained(folder)
            longctx.unpatch(model)
        torch.save(ref, work / f"ref{i}.pt")
        jobs["cases"].append({"name": case["name"], "dir": str(folder), "ref": str(work / f"ref{i}.pt"),
                              "config": (folder / "config.json").read_text()})
    return jobs


def read_with(python: Path | str, jobs: dict) -> list[dict]:
    """Run :data:`CHILD` under ``python`` on ``jobs``; one dict per case."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(python), "-c", CHILD], input=json.dumps(jobs), capture_output=True, text=True,
                          env=env, cwd=tempfile.gettempdir())
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(rows) != len(jobs["cases"]):
        raise RuntimeError(f"{python} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return rows


def cell(row: dict) -> str:
    if "error" in row:
        return "error: " + row["error"].split(":")[0]
    d = row["max_abs_diff"]
    text = "0" if d == 0 else f"{d:.1e}"
    return f"**{text}**" if d > 1e-3 else text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--releases", default=",".join(RELEASES), help="transformers releases, comma-separated")
    ap.add_argument("--methods", default=None, help="config-form methods (default: all)")
    ap.add_argument("--family", default="stories260K", choices=["stories260K", *FAMILIES],
                    help="stories260K (Llama, trained 512) or a tiny random model of another family (trained 64)")
    ap.add_argument("--length", type=int, default=None, help="tokens compared (default: the 8x target)")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the virtualenvs are kept")
    ap.add_argument("--json", type=Path, default=None, help="write every row (diffs, frequencies) here")
    args = ap.parse_args()
    import transformers

    todo = cases(args.methods.split(",") if args.methods else None)
    releases = [r for r in args.releases.split(",") if r]
    table: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        length = args.length or (4096 if args.family == "stories260K" else 512)
        jobs = write_cases(Path(tmp), todo, length, family=args.family, cache=args.cache)
        print(f"wrote {len(todo)} directories from stories260K in {time.time() - start:.0f} s", file=sys.stderr)
        for release in releases + [f"{transformers.__version__} (this one)"]:
            python = sys.executable if release.endswith("(this one)") else venv_python(release, args.cache)
            start = time.time()
            table[release] = read_with(python, jobs)
            print(f"  transformers {release}: {time.time() - start:.0f} s", file=sys.stderr)
    names = [c["name"] for c in jobs["cases"]]
    print(f"\nmax |logit difference| against the model patched in memory ({args.family}, fp32, {length} tokens; "
          "bold: > 1e-3)\n")
    print("| transformers | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for release, rows in table.items():
        print(f"| {release} | " + " | ".join(cell(r) for r in rows) + " |")
    print("".join(f"\n{c['skip']}" for c in todo if "skip" in c))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
