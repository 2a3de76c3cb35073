"""llama.cpp's own decode of a GGUF file (through llama-cpp-python), run by `make bench` in the
peer's venv (benchmarks/install_llamacpp.sh): the same prompt token ids as kiln's rows, greedy,
batch 1. Prints one JSON line: prefill ms, decode tok/s, peak RSS and the generated ids.
Usage: peer_llamacpp.py GGUF --ids JSON_FILE --new N --threads T"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("--ids", required=True)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    from llama_cpp import Llama

    ids = json.loads(open(a.ids).read())
    llm = Llama(model_path=a.gguf, n_ctx=len(ids) + a.new + 8, n_batch=512, n_threads=a.threads,
                n_threads_batch=a.threads, verbose=False)

    vocab = llm.n_vocab()

    def last_argmax() -> int:  # the last evaluated token's logits (the binding keeps no copy without logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    def once() -> tuple[float, float, list[int]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = last_argmax()
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(a.new - 1):
            llm.eval([tok])
            tok = last_argmax()
            out.append(tok)
        return (t1 - t0) * 1e3, (a.new - 1) / (time.perf_counter() - t1), out

    once()  # warm-up
    prefill, decode, out = once()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"prefill_ms": prefill, "decode_tok_s": decode, "peak_rss_bytes": rss, "tokens": out}))


if __name__ == "__main__":
    main()
