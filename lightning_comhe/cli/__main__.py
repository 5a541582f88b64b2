"""``python -m lightning_comhe.cli``: the ``comhe`` command."""

import sys

from lightning_comhe.cli import main

if __name__ == "__main__":
    sys.exit(main())
