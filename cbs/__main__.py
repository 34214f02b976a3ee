"""`python -m cbs ...`: the same as the `cbs` command (useful where the console script is not on PATH)."""

import sys

from cbs.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
