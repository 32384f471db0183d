"""Benchmark harness: tunnel against nginx and HAProxy on loopback (``python -m bench``).

Modules, one job each: ``build`` compiles the C load generator and echo backend, ``procs``
starts, stops and measures processes, ``peers`` writes the proxies' configs and starts them,
``workloads`` runs and measures one workload, ``run`` sequences a session, ``report`` makes the
table, ``cli`` reads the command line.
"""
