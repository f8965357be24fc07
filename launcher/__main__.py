"""`python -m launcher VERB`, as launch.sh runs it."""

import sys

from launcher.cli import main

sys.exit(main())
