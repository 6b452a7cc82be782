"""`python -m lmdistill ...` is the same as the `lmdistill` console script."""

import sys

from lmdistill.cli import main

if __name__ == "__main__":
    sys.exit(main())
