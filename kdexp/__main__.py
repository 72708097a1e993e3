"""``python -m kdexp``: the same as the ``kdexp`` command."""

from kdexp.cli import entry

entry()
