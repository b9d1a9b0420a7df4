"""The ``longctx`` command line (floor 5), one module per command: ``methods``, ``inspect``, ``export``, ``recommend``,
``eval {ppl,retrieval,passkey,needle}``.

Every command checks its whole input first — method names, parameters (names and values, against the method's own
config), lengths, paths, the output directory — and answers bad input with one line on stderr saying what is wrong
and what is allowed, exit code 2, before any work starts. ``--help`` imports neither torch nor transformers.
"""

from __future__ import annotations

import sys

from . import evaluate, export, inspect_model, methods, recommend, search  # noqa: F401  (each registers its command)
from .common import app, eval_app

__all__ = ["app", "eval_app", "main"]


def _click_errors() -> tuple[type, type | None]:
    """(UsageError, NoArgsIsHelpError) of the click typer runs on (typer >= 0.2x vendors its own)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions.UsageError, getattr(exceptions, "NoArgsIsHelpError", None)


def main(argv: list[str] | None = None) -> None:
    """The console script: ``app`` with click's usage errors (an unknown option, an option value of the wrong type,
    a missing argument) and a sweep's patch the model does not allow (``InvalidSweep``, found before any cell runs)
    turned into one line on stderr and exit code 2, like longctx's own checks."""
    usage_error, no_args = _click_errors()
    try:
        code = app(args=argv, prog_name="longctx", standalone_mode=False)
    except usage_error as e:
        if no_args is not None and isinstance(e, no_args):
            print(e.ctx.get_help() if e.ctx is not None else "")
            sys.exit(0)
        where = f" (see: {e.ctx.command_path} --help)" if e.ctx is not None else ""
        print(f"longctx: error: {' '.join(e.format_message().split())}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("longctx: interrupted", file=sys.stderr)
        sys.exit(130)
    except ValueError as e:  # a sweep's patch the model does not allow: found before any cell ran
        from longctx.eval.runner import InvalidSweep

        if not isinstance(e, InvalidSweep):
            raise
        print(f"longctx: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
