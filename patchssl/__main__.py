"""``python -m patchssl``: the same as the ``patchssl`` command."""

from __future__ import annotations

import sys

from patchssl.cli import main

if __name__ == "__main__":
    sys.exit(main())
