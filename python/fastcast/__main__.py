"""``python -m fastcast``: the ``fastcast`` command, for environments without its script."""

import sys

from fastcast.cli import main

sys.exit(main())
