"""`deltaedit`: the command line. Every flow runs as `deltaedit run <flow> --config FILE [key=value ...]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from app.cli_analyze import add_analyze, cmd_analyze
from app.cli_files import add_edit, add_export, cmd_edit, cmd_export
from infra.config import ConfigError, dump_config, load_config
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models import zoo

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

EPILOG = """examples:
  deltaedit flows
  deltaedit run ingest --config configs/toy.yaml ingest.source=/data/photos root=s3://bucket/run1
  deltaedit run ingest --config configs/toy.yaml --redo-failed
  deltaedit config show configs/toy.yaml ray.actors=4
  deltaedit store ls runs/toy
  deltaedit store prune runs/toy --dry-run
  deltaedit toy render 1000 --out runs/toy/catalog
  deltaedit zoo list
  deltaedit relevance compare --config configs/toy.yaml relevance.n_images=16
  deltaedit relevance import fs3.npy --config configs/ffhq.yaml
  deltaedit analyze deltaspace --images i.npy --texts t.npy --out runs/deltaspace
  deltaedit analyze edits -c configs/toy.yaml --images 32
  deltaedit demo
  deltaedit edit photo.png --prompt "a red shape" --out edited/
  deltaedit export runs/toy --to exported/ --original-size --manifest parquet
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltaedit",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Text-guided image editing with DeltaEdit, as a batch pipeline: Prefect flows "
        "over Ray actor pools, with resumable sharded stores on disk or S3.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a flow (see `deltaedit flows`)",
        description="Run one flow on a config. Finished shards are skipped; "
        "the summary counts every sample (seen = ok + failed).",
    )
    run.add_argument("flow", help="flow name, e.g. ingest")
    run.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="override config fields, values parsed as YAML (e.g. ray.actors=4)",
    )
    run.add_argument(
        "--redo-failed",
        action="store_true",
        help="retry only the failed samples of finished shards",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="delete the stage's outputs and start clean"
    )
    run.add_argument("--shards", help="comma-separated shard ids to run (default: all)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")

    sub.add_parser("flows", help="list the flows", description="List the flows `run` accepts.")

    cfg = sub.add_parser(
        "config",
        help="validate or show a config",
        description="Validate a config file, or print it with defaults filled in.",
    )
    cfg.add_argument("action", choices=["validate", "show"])
    cfg.add_argument("file")
    cfg.add_argument("overrides", nargs="*", metavar="key.path=value")

    store = sub.add_parser(
        "store",
        help="inspect a run's stores",
        description="`store ls`: the stages of a run root, their current finished shards and sample "
        "counts, and their stale shards (outputs of inputs no longer planned: removed from the "
        "catalog, or upstream shards no longer current; never read by later stages). "
        "`store prune`: delete the stale shards (--dry-run: only list them).",
    )
    store.add_argument("action", choices=["ls", "prune"])
    store.add_argument("root", help="run root (local path or URI such as s3://bucket/run)")
    store.add_argument(
        "--dry-run", action="store_true", help="prune: list what would be deleted, delete nothing"
    )

    zoo = sub.add_parser(
        "zoo",
        help="list the model zoo or train the embedded toy models",
        description="`zoo list`: the registered models. `zoo train toy`: retrain the "
        "toy generator, encoder and CLIP (the committed weights in zoo/toy; "
        "≈ 27 min on 2 CPU cores, the CLIP in a second process).",
    )
    zoo.add_argument("action", choices=["list", "train"])
    zoo.add_argument("target", nargs="?", choices=["toy"], help="what to train (train only)")
    zoo.add_argument("--out", default="zoo/toy", help="output folder (default: zoo/toy)")
    zoo.add_argument("--seed", type=int, default=0)

    toy = sub.add_parser(
        "toy",
        help="render a catalog of the procedural toy domain",
        description="Write N rendered toy images (PNG) and attributes.jsonl into a folder "
        "or URI, as a user's own image catalog would be; ingest it with "
        "`deltaedit run preprocess`.",
    )
    toy.add_argument("action", choices=["render"])
    toy.add_argument("n", type=int, help="number of images")
    toy.add_argument("--out", required=True, help="folder or URI for the catalog")
    toy.add_argument("--seed", type=int, default=0)

    rel = sub.add_parser(
        "relevance",
        help="check the fast relevance matrix against the exact one, or import a published one",
        description="`relevance compare`: compute Rs rows both ways (StyleCLIP's exact "
        "definition and the fast Jacobian) on a subset of channels, in this "
        "process, and print the mean row cosine, the top-k channel overlap per "
        "prompt and the speed ratio. Compute the whole matrix with "
        "`deltaedit run relevance`. "
        "`relevance import FILE`: StyleCLIP's published fs3.npy (one row per conv-style channel "
        "of the generator, in layer order: 6048 x 512 for FFHQ 1024) as the run's relevance_imported "
        "blocks, checked against the run's generator and CLIP (default FILE: relevance.source); "
        "bulk-edit reads it with relevance.mode: imported.",
    )
    rel.add_argument("action", choices=["compare", "import"])
    rel.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    rel.add_argument("overrides", nargs="*", metavar="key.path=value")
    rel.add_argument(
        "--channels", type=int, help="channels to compare (default: relevance.compare_channels)"
    )
    rel.add_argument(
        "--top-k", type=int, help="top-k of the overlap (default: relevance.compare_top_k)"
    )
    rel.add_argument(
        "--prompt", action="append", help="'source -> target' (repeatable; default: config)"
    )
    rel.add_argument("--json", action="store_true", help="print the result as JSON")

    add_analyze(sub)
    add_edit(sub)
    add_export(sub)

    demo = sub.add_parser(
        "demo",
        help="run the end-to-end demo on the embedded default",
        description="Set up a small catalog and run every pipeline stage that exists; a rerun skips "
        "finished work.",
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: recompute every stage of the demo run (runs/toy), e.g. when a rerun after "
        "an update stops at a model that 'holds a run with other settings'",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    args = parse(build_parser(), argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides stand anywhere (argparse stops taking positionals
    after an option such as ``--config``)."""
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = list(args.overrides or []) + overrides
    return args


def cmd_run(args: argparse.Namespace) -> int:
    from flows.registry import load_flow  # deferred: Prefect, Ray and torch load only for `run`
    from infra.runtime.prefect_runtime import ensure_prefect_api

    load_config(args.config, args.overrides)  # fail fast, before any server starts
    try:
        flow = load_flow(args.flow)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    ensure_prefect_api()
    shards = args.shards.split(",") if args.shards else None
    result = flow(
        args.config,
        args.overrides,
        redo_failed=args.redo_failed,
        overwrite=args.overwrite,
        shards=shards,
    )
    if args.json:
        print(json.dumps(result, indent=1))
    failed = [
        s
        for stage in result.values()
        if isinstance(stage, dict)
        for s in stage.get("failed_shards", [])
    ]
    return 1 if failed else 0


def cmd_flows(args: argparse.Namespace) -> int:
    from flows.registry import FLOWS  # deferred: loaded only by the command that needs it

    for entry in FLOWS.values():
        print(f"{entry.name:16s} {entry.summary}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.file, args.overrides)
    print(dump_config(cfg) if args.action == "show" else f"{args.file}: valid")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    root = Location(args.root)
    others = []
    for stage in root.listdir():
        store = StageStore(root, stage)
        stale = store.stale()
        markers = [store.marker(s) for s in store.finished()]
        if not markers and not stale:  # a model folder, a report, a catalog: not a stage store
            others.append(stage)
            continue
        if args.action == "prune":
            pruned = store.prune(dry_run=args.dry_run)
            verb = "would delete" if args.dry_run else "deleted"
            print(f"{stage:16s} {verb} {len(pruned)} stale shards" + _ids(pruned))
            continue
        totals = {
            k: sum(m["counts"].get(k, 0) for m in markers)
            for k in ("seen", "ok", "failed", "reused")
        }
        if not totals["reused"]:
            del totals["reused"]
        line = f"{stage:16s} {len(markers)} finished shards; {totals}"
        if stale:
            samples = sum(store.marker(s)["counts"]["ok"] for s in stale)
            line += f"; stale: {len(stale)} shards, {samples} ok samples" + _ids(stale)
        print(line)
    if others and args.action == "ls":
        print("other folders: " + ", ".join(others))
    return 0


def _ids(shards: list[str], shown: int = 8) -> str:
    if not shards:
        return ""
    more = f", … {len(shards) - shown} more" if len(shards) > shown else ""
    return " (" + ", ".join(shards[:shown]) + more + ")"


def cmd_zoo(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name in zoo.list_models():
            entry = zoo.get(name)
            print(f"{name:24s} {entry.role:10s} {entry.description}")
        return 0
    if args.target != "toy":
        print("error: `zoo train` needs a target: toy", file=sys.stderr)
        return 2
    from models.toy.bootstrap import bootstrap  # deferred: loaded only by the command that needs it

    print(json.dumps(bootstrap(args.out, seed=args.seed), indent=1, default=str))
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    from models.toy.catalog import (
        render_catalog,  # deferred: loaded only by the command that needs it
    )

    rows = render_catalog(args.out, args.n, seed=args.seed)
    print(f"wrote {len(rows)} images and attributes.jsonl to {args.out}")
    return 0


def cmd_relevance(args: argparse.Namespace) -> int:
    from flows.relevance import (  # deferred: loaded only by the command that needs it
        compare_relevance,
        format_comparison,
        import_relevance,
    )

    files = [a for a in args.overrides if "=" not in a]
    cfg = load_config(args.config, [a for a in args.overrides if "=" in a])
    if args.action == "import":
        if len(files) > 1:
            raise ConfigError(f"relevance import takes one file, got {files}")
        result = import_relevance(cfg, files[0] if files else None, args.config)
        print(
            json.dumps(result, indent=1)
            if args.json
            else f"imported {result['source']}: {result['rows']} x {result['embed_dim']} into "
            f"{result['uri']} ({result['ran']} blocks written, {result['skipped']} already there); "
            f"bulk-edit reads it with relevance.mode=imported"
        )
        return 0
    if files:
        raise ConfigError(f"relevance compare: expected key.path=value overrides, got {files}")
    result = compare_relevance(cfg, args.channels, args.top_k, args.prompt)
    print(json.dumps(result, indent=1) if args.json else format_comparison(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo import run_demo  # deferred: loaded only by the command that needs it

    return run_demo(overwrite=args.overwrite)


COMMANDS = {
    "run": cmd_run,
    "flows": cmd_flows,
    "config": cmd_config,
    "store": cmd_store,
    "zoo": cmd_zoo,
    "toy": cmd_toy,
    "demo": cmd_demo,
    "relevance": cmd_relevance,
    "analyze": cmd_analyze,
    "edit": cmd_edit,
    "export": cmd_export,
}

if __name__ == "__main__":
    sys.exit(main())
