"""``python -m longctx.cli``: the same as the ``longctx`` console script."""

from . import main

main()
