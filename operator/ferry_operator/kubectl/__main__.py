"""`python -m ferry_operator.kubectl ...` is `kubectl ferry ...`."""

import sys

from .cli import main

sys.exit(main())
