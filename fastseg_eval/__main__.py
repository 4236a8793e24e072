"""``python -m fastseg_eval PRED GT [options]``: the same as the ``fastseg-eval`` command."""

import sys

from fastseg_eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
