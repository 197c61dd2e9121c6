"""`python -m velocitune` is the same as the `velocitune` console script."""
import sys

from velocitune.cli import main

if __name__ == "__main__":
    sys.exit(main())
