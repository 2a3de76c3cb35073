"""The `kiln` command: build, run, inspect, eval, import.

User errors (KilnError, or a runtime ValueError/FileNotFoundError) print one line
`kiln: error: ...` on stderr and exit 2, with no traceback. `--json` prints machine-readable
results on stdout; `--quiet` drops progress output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _build(args) -> int:
    from compiler.build.driver import build
    from compiler.build.recipe import load_recipe, parse_recipe

    recipe = load_recipe(args.recipe)
    overrides = {k: v for k, v in (("max_seq", args.max_seq), ("max_batch", args.max_batch)) if v is not None}
    if args.verbose:
        overrides["tensorrt"] = {**recipe.tensorrt.model_dump(mode="json"), "verbose_log": True}
    if overrides:  # through the recipe's own validation, as if the recipe said it
        recipe = parse_recipe({**recipe.resolved(), **overrides}, f"{args.recipe} (with command-line overrides)")
    if args.list_passes:
        return _list_passes(recipe, args)
    manifest = build(recipe, Path(args.out), dump_ir=Path(args.dump_ir) if args.dump_ir else None, progress=not args.quiet,
                     force=args.force)
    dest = Path(args.out) / recipe.name
    if args.json:
        print(json.dumps({"artifact": str(dest), "build": manifest["build"], "up_to_date": manifest.get("up_to_date", False)}))
    elif manifest.get("up_to_date"):
        if not args.quiet:
            print(f"{dest} is up to date (same recipe, source, kiln and backend; --force rebuilds)")
    elif not args.quiet:
        b = manifest["build"]
        print(f"built {dest} in {b['seconds']:.1f} s, peak RSS {b['peak_rss_bytes'] / 2**30:.2f} GiB")
    return 0


def _list_passes(recipe, args) -> int:
    """The build's pipeline, one pass a line (nothing is built, read or calibrated)."""
    from compiler.build.compile import list_passes

    passes = list_passes(recipe)
    if args.json:
        print(json.dumps([{"name": n, "does": d} for n, d in passes]))
        return 0
    width = max(len(n) for n, _ in passes)
    for i, (name, does) in enumerate(passes, start=1):
        print(f"{i:2d}  {name.ljust(width)}  {does}")
    return 0


def _run(args) -> int:
    from compiler.runtime import launch, load

    world = launch.world_size(args.artifact)
    if world > 1 and not launch.inside_group():  # start the ranks: each runs this same command
        return launch.launch(world, args.argv or ["-m", "compiler.cli", *sys.argv[1:]])
    engine = load(args.artifact, threads=args.threads, config_entries=_draft_entries(args))
    if world > 1 and int(os.environ["RANK"]) != 0:  # every rank generates; rank 0 prints
        sys.stdout = open(os.devnull, "w")
    is_encoder = engine.config.task == "embed"
    if args.embed or is_encoder:
        if not is_encoder:
            raise ValueError(f"{args.artifact} is a text generator; --embed needs an encoder artifact (e.g. a BertModel)")
        return _embed(engine, args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed, stop=args.stop, chat=args.chat, **_speculate(args))
    if args.json:
        gen = engine.generate(args.prompt[-1], **kw)
        t = gen.timing
        spec = {"proposed": t.proposed, "accepted": t.accepted, "acceptance_rate": round(t.acceptance_rate, 4)}
        print(json.dumps({"text": gen.text, "tokens": gen.token_ids, "finish_reason": gen.finish_reason,
                          "prefill_ms": round(t.prefill_ms, 2), "decode_tok_s": round(t.decode_tok_s, 2), **spec}))
        return 0
    for piece in engine.stream(args.prompt[-1], **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        print(engine.last_generation.timing.summary(), file=sys.stderr)
    return 0


def _speculate(args) -> dict:
    """--speculate / --draft / --num-speculative as generate()'s speculate= and num_speculative=."""
    from compiler.runtime import Draft

    if args.draft and args.speculate not in (None, "draft"):
        raise ValueError(f"--draft goes with --speculate draft, not --speculate {args.speculate}")
    speculate = Draft(args.draft) if args.draft else args.speculate
    return {"speculate": speculate, "num_speculative": args.num_speculative}


def _draft_entries(args) -> dict | None:
    """With a draft engine beside it, the target's threads stop spinning when a step ends (two
    spinning thread pools on the same cores slow each other down ~2.5x)."""
    return {"session.force_spinning_stop": "1"} if args.draft or args.speculate == "draft" else None


def _speculative_flags(p) -> None:
    p.add_argument("--speculate", choices=("ngram", "draft", "off"),
                   help="speculative decoding: prompt lookup, a draft artifact, or off (default: the recipe's)")
    p.add_argument("--draft", help="the draft artifact for --speculate draft (same tokenizer, e.g. an int4 build)")
    p.add_argument("--num-speculative", type=_positive, help="tokens proposed a step (default: adaptive)")


def _embed(engine, args) -> int:
    """One embedding per --prompt: JSON lines with --json, else dimension, norm and a preview."""
    import numpy as np

    texts = args.prompt
    vectors = engine.embed(texts)
    for text, v in zip(texts, vectors):
        if args.json:
            print(json.dumps({"text": text, "embedding": [round(float(x), 6) for x in v]}))
        else:
            preview = ", ".join(f"{x:+.4f}" for x in v[:6])
            print(f"{len(v)}-d, norm {np.linalg.norm(v):.4f}: [{preview}, ...]  <- {text[:60]!r}")
    return 0


def _plugins(args) -> int:
    from plugins import scaffold

    if args.action == "new":
        if not args.name:
            raise ValueError("kiln plugins new needs a NAME, e.g. `kiln plugins new rope_cache`")
        dest = scaffold.new(args.name, Path(args.root) if args.root else scaffold.ROOT)
        print(f"wrote {dest}: its test fails until reference.py, decomposition.py and kernel.py are written")
        return 0
    rows = scaffold.rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:18s} {r['op']}  (rewrite pass: {r['rewrite']})")
        for key in ("onnxruntime", "tensorrt", "kernel", "cpu", "gpu"):
            print(f"  {key:12s} {r[key]}")
    return 0


def _serve(args) -> int:
    try:
        import uvicorn

        from compiler.serve.app import create_app
    except ImportError as e:
        raise ValueError(f"kiln serve needs {e.name}: pip install 'kiln[serve]'") from None
    from compiler.runtime import load
    from compiler.runtime.settings import RuntimeSettings

    if not (Path(args.artifact) / "engine.json").is_file():
        raise FileNotFoundError(f"{args.artifact} is not a kiln artifact (no engine.json); build one with `kiln build RECIPE`")
    flags = {k: getattr(args, k) for k in ("max_num_seqs", "max_num_batched_tokens", "prefix_cache_tokens", "threads",
                                           "kv_cache_gib", "speculate", "draft", "num_speculative")}
    settings = RuntimeSettings.resolve(Path(args.artifact), flags, args.tuned)  # flags > --tuned > recipe's > kiln's
    engine = load(args.artifact, threads=settings.threads, config_entries=_draft_entries(args))
    name = args.name or Path(args.artifact).resolve().name
    app = create_app(engine, name, args.max_queue, settings)
    if not args.quiet and engine.config.task != "generate":
        print(f"serving {name} on http://{args.host}:{args.port}/v1 (embeddings)", file=sys.stderr)
    elif not args.quiet:
        core = app.state.batcher.core
        use = core.kv.usage()
        kv = f"KV budget {use.budget_tokens} tokens in {use.budget_gib} GiB, " if use.block_tokens is not None else ""
        print(f"serving {name} on http://{args.host}:{args.port}/v1 ({use.rows} sequences of up to {engine.config.max_seq} "
              f"tokens, {kv}{settings.max_num_batched_tokens} tokens a step, prefix cache "
              f"{use.prefix_tokens} tokens, queue {args.max_queue}"
              f"{', speculative ' + core.sched.speculative.method if core.sched.speculative else ''})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def _publish(args) -> int:
    from compiler.ship.publish import publish

    out = publish(Path(args.artifact), args.ref)
    print(json.dumps(out) if args.json else f"published {args.artifact} -> {out['ref']}" +
          (f" ({out['digest']})" if out.get("digest") else ""))
    return 0


def _pull(args) -> int:
    from compiler.ship.publish import pull

    dest = pull(args.ref, Path(args.dir))
    if args.json or not args.quiet:
        print(json.dumps({"artifact": str(dest)}) if args.json else f"pulled {args.ref} -> {dest} (verified)")
    return 0


def _export(args) -> int:
    from compiler.ship.export_triton import TritonOptions, export

    opts = TritonOptions(name=args.name, instances=args.instances, threads=args.threads, max_batch=args.max_batch,
                         decoupled=not args.no_stream, copy=args.copy)
    model_dir = export(Path(args.artifact), Path(args.repo), opts)
    print(json.dumps({"model_dir": str(model_dir)}) if args.json else f"wrote Triton model {model_dir}")
    return 0


def _package(args) -> int:
    from compiler.ship.package import package

    archive, sums = package(Path(args.artifact), Path(args.out) if args.out else None)
    if args.json:
        print(json.dumps({"archive": str(archive), "sha256sums": str(sums), "sha256": sums.read_text().split()[0]}))
    else:
        print(f"{archive}  sha256 {sums.read_text().split()[0]}\n{sums}")
    return 0


def _support(args) -> int:
    from compiler.ship import support

    t = support.table()
    print(json.dumps(t, indent=2) if args.json else support.text(t))
    return 0


def _inspect(args) -> int:
    from compiler.ship.inspect_artifact import inspect_artifact

    info = inspect_artifact(Path(args.artifact))
    print(json.dumps(info, indent=2) if args.json else info["text"])
    return 0


def _eval(args) -> int:
    from compiler.build.evaluate import evaluate

    res = evaluate(Path(args.artifact), Path(args.reference) if args.reference else None,
                   Path(args.text) if args.text else None, window=args.window, threads=args.threads,
                   progress=not args.quiet)
    print(json.dumps(res.to_dict()) if args.json else res.table())
    return 0


def _import(args) -> int:
    from compiler.frontend.gguf_import import import_gguf

    out = import_gguf(Path(args.gguf), Path(args.out_dir), progress=not args.quiet)
    if not args.quiet:
        print(f"imported {args.gguf} -> {out}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Compile Hugging Face checkpoints into inference engines.")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, fn, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--quiet", action="store_true", help="no progress output")
        c.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        c.set_defaults(fn=fn)
        return c

    b = cmd("build", _build, "build a recipe into artifacts/<name>/")
    b.add_argument("recipe")
    b.add_argument("--out", default="artifacts", help="artifact root (default: artifacts)")
    b.add_argument("--dump-ir", metavar="DIR", help="write the graph after each pass into DIR")
    b.add_argument("--max-seq", type=int, help="override the recipe's max_seq")
    b.add_argument("--max-batch", type=int, help="override the recipe's max_batch")
    b.add_argument("--force", action="store_true", help="rebuild even when the artifact is up to date")
    b.add_argument("--list-passes", action="store_true", help="print the build's passes in order and exit (builds nothing)")
    b.add_argument("--verbose", action="store_true", help="tensorrt: keep the builder's VERBOSE log (DETAILED layers) in build.log")

    r = cmd("run", _run, "generate text with a built artifact")
    r.add_argument("artifact")
    r.add_argument("--prompt", required=True, action="append",
                   help="the prompt (with --embed, repeat it to embed several texts)")
    r.add_argument("--embed", action="store_true", help="print sentence embeddings (encoder artifacts)")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int)
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--threads", type=int, help="intra-op threads (default: the engine's, physical cores)")
    _speculative_flags(r)

    pl = cmd("plugins", _plugins, "list the custom-op plugins, or scaffold a new one")
    pl.add_argument("action", choices=["list", "new"])
    pl.add_argument("name", nargs="?", help="new: the plugin's folder name (lower_case)")
    pl.add_argument("--root", help=argparse.SUPPRESS)  # new: another plugins folder (tests)

    sv = cmd("serve", _serve, "an OpenAI-compatible HTTP server for an artifact")
    sv.add_argument("artifact")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--name", help="model id in the API (default: the artifact's directory name)")
    sv.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get HTTP 429")
    sv.add_argument("--max-num-seqs", type=_positive,
                    help="sequences generated at once (KV rows; default 64 on CPU, the engine's max_batch on GPUs)")
    sv.add_argument("--max-num-batched-tokens", type=_positive,
                    help="tokens one engine step feeds: every running decode, then prompt chunks (default 512)")
    sv.add_argument("--kv-cache-gib", type=float,
                    help="KV memory budget (CPU default 4): CPU rows take memory as they fill and a request waits "
                         "until its prompt and max_tokens fit; GPU rows are whole, so a budget means fewer rows")
    sv.add_argument("--prefix-cache-tokens", type=int,
                    help="KV of shared prompt prefixes kept for reuse, in tokens (0: off; CPU engines; default 4096)")
    sv.add_argument("--threads", type=int, help="intra-op threads (default: the engine's, physical cores)")
    sv.add_argument("--tuned", metavar="WORKLOAD", help="start with the settings `kiln tune` chose for WORKLOAD "
                                                        "(recorded in the artifact); flags given here override them")
    _speculative_flags(sv)
    pb = cmd("publish", _publish, "push an artifact to an OCI registry (ORAS) or a directory")
    pb.add_argument("artifact")
    pb.add_argument("ref", help="HOST[:PORT]/REPO[:TAG] or dir://PATH")
    pl = cmd("pull", _pull, "fetch and verify an artifact from a registry or directory")
    pl.add_argument("ref")
    pl.add_argument("dir", help="parent directory; the artifact lands in DIR/<name>")
    ex = cmd("export", _export, "export an artifact for a serving system (triton)")
    ex.add_argument("target", choices=["triton"])
    ex.add_argument("artifact")
    ex.add_argument("--repo", required=True, help="the Triton model repository directory")
    ex.add_argument("--name", help="model name (default: the artifact's)")
    ex.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    ex.add_argument("--threads", type=int, default=0, help="intra-op threads per instance (0: physical cores)")
    ex.add_argument("--max-batch", type=int, default=4, help="requests generated together")
    ex.add_argument("--no-stream", action="store_true", help="one response per request instead of decoupled streaming")
    ex.add_argument("--copy", action="store_true", help="copy the artifact into the repository")
    pk = cmd("package", _package, "a deterministic archive of an artifact plus SHA256SUMS")
    pk.add_argument("artifact")
    pk.add_argument("--out", help="directory for the archive (default: beside the artifact)")
    cmd("support", _support, "architectures x backends x precisions covered by the test suite")
    i = cmd("inspect", _inspect, "print an artifact's manifest and graph summary")
    i.add_argument("artifact")

    e = cmd("eval", _eval, "perplexity of an artifact on a fixed token window, optionally against a reference")
    e.add_argument("artifact")
    e.add_argument("--reference", metavar="ARTIFACT_OR_CHECKPOINT", help="artifact dir, or checkpoint dir (built to fp32)")
    e.add_argument("--text", metavar="FILE", help="UTF-8 text to score (default: Python's pydoc topics)")
    e.add_argument("--window", type=int, default=2048, help="tokens scored (default: 2048)")
    e.add_argument("--threads", type=int, help="intra-op threads (default: the engine's, physical cores)")

    from compiler.tune.command import add_parser as add_tune

    add_tune(cmd)
    m = cmd("import", _import, "import a GGUF file into a Hugging Face checkpoint directory")
    m.add_argument("gguf")
    m.add_argument("out_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    from compiler.errors import KilnError

    args = parser().parse_args(argv)
    args.argv = None if argv is None else ["-m", "compiler.cli", *argv]  # how ranks re-run this command
    try:
        return args.fn(args)
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        if args.command in ("build", "tune"):  # the build side raises KilnError for bad input: anything else is a bug
            raise
        print(f"kiln: error: {e}", file=sys.stderr)
    except ImportError as e:
        print(f"kiln: error: `kiln {args.command}` needs the build extra ({e.name} is missing); pip install 'kiln[build]'",
              file=sys.stderr)
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
