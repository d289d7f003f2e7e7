"""``streamcqsa`` command line: init, run, backward, status, verify, plan, repair, demo.

Errors the library raises on purpose are printed as one line naming the
command-line flags (not the Python keywords) that change the outcome, with
exit status 2 for bad input or a store in the wrong state and 1 for a run
that failed (I/O, device); Ctrl-C exits 130 and says how to resume.
"""

from __future__ import annotations

import re
import sys

from streamcqsa.cli.parser import parser
from streamcqsa.errors import StreamCQSAError

# the library's messages name its Python keywords; here they become the flags
_FLAGS = (
    (r"\brestart=True\b", "--restart"),
    (r"\boverwrite=True\b", "--overwrite"),
    (r"\ballow_nonfinite=True\b", "--allow-nonfinite"),
    (r"\bkeep_partials=True\b", "--keep-partials"),
    (r"\bunit_depth=None\b", "--unit-depth leaves"),
    (r"\bunit_depth=(\d+)", r"--unit-depth \1"),
    (r"\bpass dout=\.\.\.", "pass --dout FILE or --random-dout SEED"),
    (r"\bcall run\(\) first", "run `streamcqsa run` first"),
)


def cli_message(message: str) -> str:
    """A library message with each keyword argument it names as its CLI flag."""
    for pattern, flag in _FLAGS:
        message = re.sub(pattern, flag, message)
    return message


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if getattr(args, "path", None) is not None:
            from streamcqsa.storage.location import Location

            args.path = Location.of(args.path, dict(args.storage_options or []) or None)
        return int(args.func(args))
    except KeyboardInterrupt:
        resume = "; rerun to resume" if args.command in ("run", "backward") else ""
        print(f"\nstreamcqsa {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except (StreamCQSAError, ValueError, TypeError, OSError, ImportError) as e:
        print(f"streamcqsa {args.command}: error: {cli_message(str(e))}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, TypeError, ImportError)) else 1


__all__ = ["cli_message", "main", "parser"]
