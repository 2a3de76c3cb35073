"""kiln's compiler: checkpoint frontends, graph IR, passes, backends and the thin runtime."""

__version__ = "0.1.0"
