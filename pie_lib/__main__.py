"""``python -m pie_lib`` is the ``pie`` command."""

from pie_lib.cli import run

run()
