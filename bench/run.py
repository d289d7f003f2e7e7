"""``make bench``: run the benchmark suite (``bench/suite.py``) and write its one table.

Writes bench/results/suite.md and suite.json (``--quick``: suite-quick.*, tiny
sizes, one repeat). Usage: python bench/run.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import main  # noqa: E402  (bench/ is not a package)

if __name__ == "__main__":
    main()
