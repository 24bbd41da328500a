"""``python -m gapnet``: the gapnet command line (`gapnet.cli`)."""

import sys

from gapnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
