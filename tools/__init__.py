"""Developer tools that are not part of the library and not launch recipes.

``tools/netcluster.py``: a simulated multi-node cluster on one Linux machine (network namespaces
behind a shaped bridge), used by the communication benchmarks and tests/distributed/test_cluster.py.
"""
