"""`python -m ferry_kubectl ...` is `kubectl ferry ...`."""

import sys

from .cli import main

sys.exit(main())
