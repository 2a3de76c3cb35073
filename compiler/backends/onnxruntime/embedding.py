"""Row-major embedding lookup once the tied lm_head no longer shares the table.

Ours (onnxscript has no such rule): kiln's frontend stores a tied embedding once as the lm_head's
[H, V] weight and looks tokens up by column; when quantisation gave the lm_head its own copy,
the lookup can read rows of a transposed table instead.
  Pattern: Transpose(Gather(table [H, V], ids, axis=1), perm=[1, 2, 0]).
  Replacement: Gather(table^T [V, H], ids, axis=0), the transposed table made lazily when the
  model is saved: each token reads one contiguous row instead of H values a vocabulary apart.
  Check: refuses when the table is not a constant or has other readers (the lm_head's weight).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


class EmbeddingRows(pattern.RewriteRuleClassBase):
    """Column Gather + Transpose of a [H, V] table -> row Gather of its [V, H] transpose."""

    def __init__(self):
        super().__init__("EmbeddingRows")

    def pattern(self, op, table, ids):
        columns = op.Gather(table, ids, axis=1, _outputs=["columns"])
        return op.Transpose(columns, perm=[1, 2, 0])

    def check(self, context, table, columns, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if table.const_value is None:
            return result.fail("the table is not a constant")
        if len(list(table.uses())) != 1:
            return result.fail("the table is shared with the lm_head")
        return result

    def rewrite(self, op, table, ids, columns, **_):
        src = table.const_value
        rows = ir.LazyTensor(lambda: ir.Tensor(np.ascontiguousarray(src.numpy().T)), dtype=src.dtype,
                             shape=ir.Shape([src.shape[1], src.shape[0]]), name=f"{table.name}.rows")
        return op.Gather(op.initializer(rows), ids, axis=0, _name=columns.producer().name)


def rules() -> list[pattern.RewriteRuleSet]:
    return [pattern.RewriteRuleSet([EmbeddingRows.rule()])]
