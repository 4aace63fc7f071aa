"""``python -m engine ...`` is the ``maskfeat`` command (see ``engine/cli.py``)."""
import sys

from engine.cli import main

sys.exit(main())
