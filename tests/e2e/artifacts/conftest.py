import sys
from pathlib import Path

# Shared tree/snapshot helpers live with the unit tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "artifacts"))
