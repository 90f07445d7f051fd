"""``python -m ntklayers``: the command line (see ``ntklayers --help``)."""

import sys

from ntklayers.cli import main

if __name__ == "__main__":
  sys.exit(main())
