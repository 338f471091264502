"""`python -m memstore.cli`: the `memstore` command."""

import os

from memstore.cli import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
main()
