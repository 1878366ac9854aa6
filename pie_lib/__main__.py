"""``python -m pie_lib`` is the ``pie`` command."""

import sys

from pie_lib.cli import main

sys.exit(main())
