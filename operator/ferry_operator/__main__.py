"""`python -m ferry_operator ...` is `ferry operator ...`."""

import sys

from ferry_api.cli import main

sys.exit(main(["operator", *sys.argv[1:]]))
