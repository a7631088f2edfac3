"""``python -m napari_whatishealthy`` (and ``torchrun -m napari_whatishealthy``): the CLI."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
