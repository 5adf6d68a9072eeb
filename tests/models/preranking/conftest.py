"""Makes `preranking_helpers` (the tiny schema shared by these tests) importable."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.append(HERE)  # after tests/, so `import conftest` still finds the shared one
