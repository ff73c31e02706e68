import os

# Keep every test process to one intra-op thread: the CI machine has 2 cores and the
# distributed tests run several ranks at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys
from pathlib import Path

# `benchmarks` is a package at the repository root; tests reuse its reference computations.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
