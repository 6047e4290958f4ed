"""``python -m slim_lightning.generate RUN/packed``: streamed generation (``deploy.generate``)."""

import sys

from .deploy.generate import main

if __name__ == "__main__":
    sys.exit(main())
