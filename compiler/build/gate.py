"""The quality gate of `kiln build`: a quantised engine (weights or KV rows) against the fp32 engine of its source
(perplexity, top-1 agreement, KL on the recipe's text window); a violated limit fails the build."""

from __future__ import annotations

import sys
from pathlib import Path

from compiler.build.evaluate import evaluate
from compiler.build.recipe import Recipe
from compiler.errors import KilnError


def quality_gate(recipe: Recipe, artifact: Path, source: Path, progress: bool) -> dict:
    """Perplexity, top-1 agreement and KL vs the fp32 engine; a violated limit fails the build."""
    q = recipe.quality
    res = evaluate(artifact, reference=source, text_path=Path(q.text) if q.text else None, window=q.window, progress=progress,
                   adapters=recipe.adapter_list())  # the reference is the fp32 merged model
    figures = res.to_dict()
    failed = []
    if q.max_ppl_increase_pct is not None and figures["ppl_increase_pct"] > q.max_ppl_increase_pct:
        failed.append(f"perplexity +{figures['ppl_increase_pct']:.2f}% > +{q.max_ppl_increase_pct}%")
    if q.min_top1_agreement is not None and res.top1_agreement < q.min_top1_agreement:
        failed.append(f"top-1 agreement {res.top1_agreement:.4f} < {q.min_top1_agreement}")
    summary = (f"quality: perplexity {res.perplexity:.3f} vs fp32 {res.reference_perplexity:.3f} "
               f"({figures['ppl_increase_pct']:+.2f}%), top-1 agreement {res.top1_agreement:.4f}, mean KL {res.mean_kl:.5f}")
    if failed:
        raise KilnError(f"{recipe.name}: quality limit violated: {'; '.join(failed)} [{summary}]",
                        "relax quality limits in the recipe or choose a more precise scheme")
    if progress:
        print(summary, file=sys.stderr)
    return figures
