"""`python -m doratweet ...`: the same as the `doratweet` command (useful where the package is on PYTHONPATH
but not installed, as on a machine without network)."""

import sys

from .cli import main

sys.exit(main())
