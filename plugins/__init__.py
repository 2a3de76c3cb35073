"""kiln plugins: one folder per custom op (schema, reference, decomposition, kernels, bindings)."""
