"""``python -m streamcqsa.cli``: the same command line as ``streamcqsa``."""

import sys

from streamcqsa.cli import main

sys.exit(main())
