"""The thin runtime: loads kiln artifacts and generates. Imports nothing from the build side,
so a server needs only numpy, onnxruntime, tokenizers (and jinja2 for chat templates)."""

from compiler.runtime.engine import Draft, Engine, Generation, GenerationConfig, Timing, load

__all__ = ["Draft", "Engine", "Generation", "GenerationConfig", "Timing", "load"]
