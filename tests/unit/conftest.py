import sys
from pathlib import Path

# tests/support: the fakes and test certificates shared by test suites.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
