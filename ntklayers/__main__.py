"""``python -m ntklayers``: the command line (see ``ntklayers --help``)."""

import sys

from ntklayers._cli import main

if __name__ == "__main__":
  sys.exit(main())
