"""Grammar libraries for structured outputs: the per-step token-mask cost of llguidance and xgrammar
on one engine's tokenizer (docs/decisions/structured-outputs.md).

For each case (a 6-field JSON schema, free JSON, a regex) the same valid answer is tokenized and
replayed token by token: at every step the library computes the next-token mask, then consumes
the token. Reported: grammar compile time, mask time per step (median and p99), and the total over
the answer. Both libraries see the same tokens. A benchmark, not a test.

    python benchmarks/bench_grammar.py --artifact artifacts/smollm2-135m --out bench-results/bench-grammar.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from serve_load import machine  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "city", "age", "email", "member", "tags"],
          "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "email": {"type": "string", "pattern": "^[a-z.]+@[a-z]+\\.[a-z]+$"},
                         "member": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}}}}
ANSWER = json.dumps({"name": "Ada Lovelace", "city": "London", "age": 36, "email": "ada@maths.org",
                     "member": True, "tags": ["analytical", "engine", "notes"]})
CASES = {
    "json_schema": ("schema", json.dumps(SCHEMA), ANSWER),
    "json_object": ("schema", json.dumps({"type": "object"}), ANSWER),
    "regex": ("regex", r"\d{3}-\d{3}-\d{4}( ext\. \d{1,5})?", "415-555-0134 ext. 12"),
}


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def llguidance_case(tok_json: str, vocab: int, eos: int, kind: str, spec: str, ids: list[int]) -> dict:
    import llguidance
    import llguidance.numpy as lnp

    t_tok, tok = timed(lambda: llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos))
    grammar = (llguidance.LLMatcher.grammar_from_json_schema(spec) if kind == "schema"
               else llguidance.LLMatcher.grammar_from_regex(spec))
    t_compile, m = timed(lambda: llguidance.LLMatcher(tok, grammar))
    mask = lnp.allocate_token_bitmask(1, vocab)
    steps = []
    for t in ids:
        dt, _ = timed(lambda: lnp.fill_next_token_bitmask(m, mask, 0))
        steps.append(dt)
        assert m.consume_token(t), m.get_error()
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "steps": steps}


def xgrammar_case(artifact: Path, vocab: int, kind: str, spec: str, ids: list[int]) -> dict:
    import transformers
    import xgrammar

    hf = transformers.AutoTokenizer.from_pretrained(str(artifact))
    t_tok, info = timed(lambda: xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab))
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    t_compile, compiled = timed(lambda: compiler.compile_json_schema(spec) if kind == "schema"
                                else compiler.compile_regex(spec))
    m = xgrammar.GrammarMatcher(compiled)
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    steps = []
    for t in ids:
        dt, _ = timed(lambda: m.fill_next_token_bitmask(mask))
        steps.append(dt)
        assert m.accept_token(t)
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "steps": steps}


def summary(r: dict) -> dict:
    s = sorted(r.pop("steps"))
    return {**r, "tokens": len(s), "mask_median_us": 1e6 * statistics.median(s),
            "mask_p99_us": 1e6 * s[min(len(s) - 1, int(0.99 * len(s)))], "mask_total_ms": 1e3 * sum(s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/smollm2-135m"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.artifact / "tokenizer.json"))
    engine = json.loads((args.artifact / "engine.json").read_text())
    vocab, eos = engine["vocab_size"], engine["generation"]["eos_token_ids"][0]
    rows = []
    for case, (kind, spec, answer) in CASES.items():
        ids = tokenizer.encode(answer, add_special_tokens=False).ids + [eos]
        for lib, run in (("llguidance", lambda: llguidance_case(tokenizer.to_str(), vocab, eos, kind, spec, ids)),
                         ("xgrammar", lambda: xgrammar_case(args.artifact, vocab, kind, spec, ids))):
            try:
                rows.append({"case": case, "library": lib, **summary(run())})
            except ImportError as e:
                print(f"{lib}: not installed ({e.name}); pip install {lib}")
    print(f"{'case':12} {'library':11} {'compile ms':>10} {'mask med us':>11} {'p99 us':>8} {'total ms':>9}")
    for r in rows:
        print(f"{r['case']:12} {r['library']:11} {1e3 * r['compile_s']:10.2f} {r['mask_median_us']:11.1f} "
              f"{r['mask_p99_us']:8.1f} {r['mask_total_ms']:9.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "vocab": vocab, "rows": rows}, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
