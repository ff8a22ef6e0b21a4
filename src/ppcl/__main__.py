"""``python -m ppcl`` is the ``ppcl`` command."""

import sys

from ppcl.cli.main import main

sys.exit(main())
