"""paged_attention: the engine's attention over the KV rows kiln's engine core owns, run on the CPU
by kiln's own compiled kernel (cpu_kernel.c through cpu.py) between ONNX Runtime graph parts, with
float32, float16, bfloat16, int8 or fp8 rows. The plugin description is in plugin.py, so that the
runtime, which imports only cpu.py and reference.py (numpy), never loads onnx."""
