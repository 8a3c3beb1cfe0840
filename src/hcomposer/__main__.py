"""``python -m hcomposer``: the same command line as ``hcomposer``."""

import sys

from hcomposer.cli import main

sys.exit(main())
