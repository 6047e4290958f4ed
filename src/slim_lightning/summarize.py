"""``python -m slim_lightning.summarize RUNS``: a multirun as one table (``app.summarize``)."""

from .app.summarize import main

if __name__ == "__main__":
    main()
