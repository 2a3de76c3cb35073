"""The tune package behind `kiln tune RECIPE --workload W`: it picks build and serving settings for
a declared workload by replaying a seeded request trace against the in-process engine core.
workload.py holds the workload files' schema (workloads/*.yaml: lengths, arrivals, targets) and
their loader; trace.py turns a workload into a deterministic list of requests; pareto.py keeps the
candidates no other beats on throughput and latency; replay.py runs a trace against an engine and
measures it; tune.py searches the settings and writes the result.
"""
