"""Worker processes of the benchmarks: scripts that torchrun starts on each node of the simulated
cluster (a driver in benchmarks/ starts them; each prints or writes its result for the driver)."""
