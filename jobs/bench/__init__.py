"""Benchmark helpers: workloads, peers measured in the same run, machine limits, reports."""
