import os

# Keep every test process to one intra-op thread: the CI machine has 2 cores and the
# distributed tests run several ranks at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
