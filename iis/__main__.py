"""``python -m iis``: the same as the ``iis`` command."""

import sys

from iis.cli import main

# Guarded: multiprocessing (Dask's worker processes) may import the main module under another name.
if __name__ == "__main__":
    sys.exit(main())
