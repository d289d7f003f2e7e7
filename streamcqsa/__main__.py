"""``python -m streamcqsa``: the ``streamcqsa`` command line."""

import sys

from streamcqsa.cli import main

sys.exit(main())
