"""`python -m epsdpo ...` is the `epsdpo` command."""

import sys

from epsdpo.cli import main

sys.exit(main())
