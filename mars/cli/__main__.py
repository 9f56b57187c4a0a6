"""``python -m mars.cli``: the ``mars`` command (used to start ``mars serve`` as a subprocess)."""

from mars.cli import main

main()
