"""Fusions: one family per file, each a pattern, a replacement and a check that says why it refused."""
