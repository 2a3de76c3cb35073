"""The build walk: which files and functions of compiler/ and plugins/ a `kiln build` passes through.

    .venv/bin/python scripts/build_walk.py recipes/smollm2-135m-int4.yaml [--root DIR] [--json]

Builds the recipe in this process under a profiler hook (into a temporary directory) and counts
the distinct source files and functions of compiler/ and plugins/ that ran, build-side only
(the quality gate's reference engine is built in a child process, which is not followed).
--root points at another checkout (e.g. a `git worktree` of an older commit) to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path


def walk(recipe_path: Path, root: Path) -> dict:
    sys.path.insert(0, str(root))
    from compiler.build.driver import build
    from compiler.build.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    tops = tuple(str(root / d) + "/" for d in ("compiler", "plugins"))
    seen: set[tuple[str, str, int]] = set()

    def hook(frame, event, _arg):
        if event == "call":
            code = frame.f_code
            if code.co_filename.startswith(tops):
                seen.add((code.co_filename, code.co_qualname, code.co_firstlineno))

    with tempfile.TemporaryDirectory(prefix="kiln-walk-") as out:
        sys.setprofile(hook)
        try:
            build(recipe, Path(out), progress=False, force=True)
        finally:
            sys.setprofile(None)
    files = Counter(Path(f).relative_to(root).as_posix() for f, _, _ in seen)
    return {"recipe": str(recipe_path), "root": str(root), "files": len(files),
            "functions": sum(1 for _, name, _ in seen if "<" not in name), "per_file": dict(sorted(files.items()))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=Path)
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to trace")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    res = walk(a.recipe.resolve(), a.root.resolve())
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['recipe']}: {res['files']} files, {res['functions']} functions ({res['root']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
