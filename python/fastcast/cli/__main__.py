"""``python -m fastcast.cli``: the ``fastcast`` command."""

import sys

from fastcast.cli.main import main

sys.exit(main())
