"""``python -m protobase``: the same command line as the ``protobase`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
