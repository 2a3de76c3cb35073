"""Parallelism passes: split a model's graph into the graph of one rank."""
