"""The engine card: each artifact's README.md, rendered from templates/engine_card.md.j2 out of
its manifest (source, recipe, passes, quantization, quality and speed figures, targets, how to
load it)."""

from __future__ import annotations

from pathlib import Path

import jinja2

TEMPLATE_DIR = Path(__file__).with_name("templates")


def render(manifest: dict) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.ChainableUndefined,
                             keep_trailing_newline=True, autoescape=False)
    return env.get_template("engine_card.md.j2").render(m=manifest)
