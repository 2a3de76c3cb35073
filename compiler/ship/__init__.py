"""The ship stage: what happens to a built artifact: package, publish and pull, inspect, export to Triton, the support matrix."""
