"""``chat bench``: load generators, workloads, machine limits and the report.

Kept free of imports here: the load generator processes import ``chatserver.bench.loadgen``
and should pay for nothing else.
"""
