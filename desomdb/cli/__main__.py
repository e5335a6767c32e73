"""``python -m desomdb.cli``: the ``desomdb`` command."""

from desomdb.cli import main

main()
