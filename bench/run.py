"""``make bench``: run the benchmark suite (``bench/suite.py``) and write its one table.

Writes bench/results/suite.md and suite.json (``--quick``: suite-quick.*, tiny
sizes, one repeat), then bench/results/README.md, the index of every result
file (command, machine, date, commit; ``bench/results_readme.py``).

Usage: python bench/run.py [--quick]   or   python bench/run.py --readme
(``--readme`` only rewrites bench/results/README.md from the files there).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_readme  # noqa: E402  (bench/ is not a package)

if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        print(f"wrote {results_readme.write()}")
    else:
        from suite import main  # noqa: E402

        main()
        if "--out" not in sys.argv[1:]:  # the suite wrote into bench/results
            print(f"wrote {results_readme.write()}")
