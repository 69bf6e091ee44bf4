"""``python -m tunesec``: the command line (what ``accelerate launch -m tunesec ...`` runs on each process)."""

import sys

from tunesec.cli.main import main

sys.exit(main())
