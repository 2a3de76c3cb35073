"""kiln::Sample: the next token of each row from its logits, at the end of the engine, so only
token ids leave the device each step (not [B, V] logits).

Inputs: logits [B, V] (float), temperature [B] (float; <= 0 means greedy), top_k [B] (int64;
<= 0 means no limit), top_p [B] (float; >= 1 means no limit), draws [B] (float, uniform in
[0, 1): the caller's random numbers, so a seed fixes the result). Output: tokens [B] int64.

Semantics (the reference is the definition): greedy rows take the first maximum. Other rows
divide by the temperature, sort descending (ties by lower id), keep the first top_k, softmax,
keep the smallest prefix whose probability before each token stays below top_p, and take the
first sorted position whose cumulative kept weight exceeds draw * total.
"""

from __future__ import annotations

import onnx

from plugins.spec import Port

OP_TYPE = "Sample"
INPUTS = (Port("logits", "[B, V] scores"), Port("temperature", "[B]"), Port("top_k", "[B] int64"), Port("top_p", "[B]"),
          Port("draws", "[B] uniform draws in [0, 1)"))
OUTPUTS = (Port("tokens", "[B] int64 next token per row"),)
ATTRS = ()


def infer(dtypes: list, shapes: list, attrs: dict) -> list[tuple]:
    logits = shapes[0]
    if len(logits) != 2:
        raise ValueError(f"Sample: logits must be [B, V], got {logits}")
    for name, t, s in zip(("temperature", "top_k", "top_p", "draws"), dtypes[1:], shapes[1:]):
        if len(s) != 1:
            raise ValueError(f"Sample: {name} must be [B], got {s}")
        if (name == "top_k") != (t == onnx.TensorProto.INT64):
            raise ValueError(f"Sample: {name} has element type {t}; top_k is int64, the others float")
    return [(onnx.TensorProto.INT64, [logits[0]])]
