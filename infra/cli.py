"""`deltaedit`: the command line. Every flow runs as `deltaedit run <flow> --config FILE [key=value ...]`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

from infra.config import ConfigError, dump_config, load_config

OFFLINE_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                    "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

EPILOG = """examples:
  deltaedit flows
  deltaedit run ingest --config configs/toy.yaml ingest.source=/data/photos root=s3://bucket/run1
  deltaedit run ingest --config configs/toy.yaml --redo-failed
  deltaedit config show configs/toy.yaml ray.actors=4
  deltaedit store ls runs/toy
  deltaedit toy render 1000 --out runs/toy/catalog
  deltaedit zoo list
  deltaedit relevance compare --config configs/toy.yaml relevance.n_images=16
  deltaedit analyze deltaspace --images i.npy --texts t.npy --out runs/deltaspace
  deltaedit analyze edits -c configs/toy.yaml --images 32
  deltaedit demo
  deltaedit edit photo.png --prompt "a red shape" --out edited/
  deltaedit export runs/toy --to exported/ --original-size --manifest parquet
"""

TOY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltaedit", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Text-guided image editing with DeltaEdit, as a batch pipeline: Prefect flows "
                    "over Ray actor pools, with resumable sharded stores on disk or S3.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a flow (see `deltaedit flows`)",
                         description="Run one flow on a config. Finished shards are skipped; "
                                     "the summary counts every sample (seen = ok + failed).")
    run.add_argument("flow", help="flow name, e.g. ingest")
    run.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    run.add_argument("overrides", nargs="*", metavar="key.path=value",
                     help="override config fields, values parsed as YAML (e.g. ray.actors=4)")
    run.add_argument("--redo-failed", action="store_true",
                     help="retry only the failed samples of finished shards")
    run.add_argument("--overwrite", action="store_true", help="delete the stage's outputs and start clean")
    run.add_argument("--shards", help="comma-separated shard ids to run (default: all)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")

    sub.add_parser("flows", help="list the flows", description="List the flows `run` accepts.")

    cfg = sub.add_parser("config", help="validate or show a config",
                         description="Validate a config file, or print it with defaults filled in.")
    cfg.add_argument("action", choices=["validate", "show"])
    cfg.add_argument("file")
    cfg.add_argument("overrides", nargs="*", metavar="key.path=value")

    store = sub.add_parser("store", help="inspect a run's stores",
                           description="List the stages of a run root and their finished shards.")
    store.add_argument("action", choices=["ls"])
    store.add_argument("root", help="run root (local path or URI such as s3://bucket/run)")

    zoo = sub.add_parser("zoo", help="list the model zoo or train the embedded toy models",
                         description="`zoo list`: the registered models. `zoo train toy`: retrain the "
                                     "toy generator, encoder and CLIP (the committed weights in zoo/toy; "
                                     "≈ 27 min on 2 CPU cores, the CLIP in a second process).")
    zoo.add_argument("action", choices=["list", "train"])
    zoo.add_argument("target", nargs="?", choices=["toy"], help="what to train (train only)")
    zoo.add_argument("--out", default="zoo/toy", help="output folder (default: zoo/toy)")
    zoo.add_argument("--seed", type=int, default=0)

    toy = sub.add_parser("toy", help="render a catalog of the procedural toy domain",
                         description="Write N rendered toy images (PNG) and attributes.jsonl into a folder "
                                     "or URI, as a user's own image catalog would be; ingest it with "
                                     "`deltaedit run preprocess`.")
    toy.add_argument("action", choices=["render"])
    toy.add_argument("n", type=int, help="number of images")
    toy.add_argument("--out", required=True, help="folder or URI for the catalog")
    toy.add_argument("--seed", type=int, default=0)

    rel = sub.add_parser("relevance", help="check the fast relevance matrix against the exact one",
                         description="`relevance compare`: compute Rs rows both ways (StyleCLIP's exact "
                                     "definition and the fast Jacobian) on a subset of channels, in this "
                                     "process, and print the mean row cosine, the top-k channel overlap per "
                                     "prompt and the speed ratio. Compute the whole matrix with "
                                     "`deltaedit run relevance`.")
    rel.add_argument("action", choices=["compare"])
    rel.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    rel.add_argument("overrides", nargs="*", metavar="key.path=value")
    rel.add_argument("--channels", type=int, help="channels to compare (default: relevance.compare_channels)")
    rel.add_argument("--top-k", type=int, help="top-k of the overlap (default: relevance.compare_top_k)")
    rel.add_argument("--prompt", action="append", help="'source -> target' (repeatable; default: config)")
    rel.add_argument("--json", action="store_true", help="print the result as JSON")

    add_analyze(sub)
    add_edit(sub)
    add_export(sub)

    sub.add_parser("demo", help="run the end-to-end demo on the embedded default",
                   description="Set up a small catalog and run every pipeline stage that exists.")
    return parser


ANALYZE_DESCRIPTION = (
    "`analyze deltaspace`: DeltaEdit's premise, measured on paired CLIP features. CLIP image and "
    "text embeddings are not aligned across modalities, but their differences (Δi, Δt) are. "
    "Reports, in raw space (i, t) and in delta space (Δi, Δt): the mean cosine of paired rows "
    "against a seeded shuffled-pairs baseline; image→text retrieval top-1/top-5 with chance level; "
    "the modality gap (distance between the centroids of the L2-normalised image and text rows, "
    "Liang et al. 2022) and the mean cross-modal cosine. Writes deltaspace.json and a PCA plot "
    "(deltaspace.png/.svg, like the paper's Fig. 1) to --out.")
EDITS_DESCRIPTION = (
    "`analyze edits`: where a run's edits are lost, per attribute and per prompt. (1) The S-space "
    "ceiling of the generator: for sample codes and each attribute value, a counterfactual code "
    "that differs only in that attribute; its conv styles with the sample's toRGB styles "
    "(conv_only: what DeltaEdit can reach), its toRGB styles alone (rgb_only) and the whole code "
    "(full_swap) are decoded and read by the attribute classifier. (2) Per prompt of "
    "bulk_edit.prompts: the channels the run's relevance threshold keeps, and DeltaEdit's edit "
    "accuracy and preservation on the run's inverted images at tau = 0 (mask off) and at the run's "
    "tau, computed by the bulk-edit stage's code and scored as the evaluate stage scores. Prints "
    "the tables and writes analysis.json and analysis.md to <root>/analysis (the evaluate report "
    "includes them when present).")


def _fill(*paragraphs: str) -> str:
    """Paragraphs wrapped for a RawDescriptionHelpFormatter (it keeps the blank lines between)."""
    return "\n\n".join(textwrap.fill(p, 100) for p in paragraphs)


def add_analyze(sub: argparse._SubParsersAction) -> None:
    """`analyze deltaspace` and `analyze edits`, each with its own flags (`analyze ACTION -h`)."""
    ana = sub.add_parser(
        "analyze", help="analyses: deltaspace (are CLIP image/text deltas aligned?), edits (where "
                        "is an edit lost: generator ceiling, relevance mask or mapper?)",
        description=_fill(ANALYZE_DESCRIPTION, EDITS_DESCRIPTION),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="actions (`deltaedit analyze ACTION --help` describes each flag):\n"
               "  deltaspace --images I.npy --texts T.npy [--delta-images DI.npy "
               "--delta-texts DT.npy]\n"
               "             [--parquet F.parquet ...] [--pairs N] [--seed S] --out DIR [--json]\n"
               "  edits -c CONFIG [key=value ...] [--images N] [--samples N] [--classifier SPEC]\n"
               "             [--counterfactuals SPEC] [--seed S] [--out DIR] [--json]")
    actions = ana.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_deltaspace(actions)
    add_edits(actions)


def add_deltaspace(actions: argparse._SubParsersAction) -> None:
    ana = actions.add_parser(
        "deltaspace", help="are CLIP image and text deltas aligned? (paired features)",
        description=ANALYZE_DESCRIPTION,
        epilog="inputs: .npy files of shape (rows, dim), or one Parquet table with vector columns "
               "(list or fixed_size_list); local paths or fsspec URIs. Row r of the image and text "
               "features must describe the same pair. Without delta features, Δi = i[a] − i[b] and "
               "Δt = t[a] − t[b] are formed from --pairs seeded random row pairs (a ≠ b), as "
               "DeltaEdit does.")
    ana.add_argument("--images", metavar="I.npy", help="image features, one row per pair")
    ana.add_argument("--texts", metavar="T.npy", help="text features, same rows as --images")
    ana.add_argument("--delta-images", metavar="DI.npy",
                     help="image deltas Δi (optional, with --delta-texts)")
    ana.add_argument("--delta-texts", metavar="DT.npy",
                     help="text deltas Δt, same rows as --delta-images")
    ana.add_argument("--parquet", metavar="F.parquet",
                     help="read every feature from this table instead")
    ana.add_argument("--image-column", default="image", metavar="COL",
                     help="Parquet column of image vectors (default: image)")
    ana.add_argument("--text-column", default="text", metavar="COL",
                     help="Parquet column of text vectors (default: text)")
    ana.add_argument("--delta-image-column", metavar="COL", help="Parquet column of Δi (optional)")
    ana.add_argument("--delta-text-column", metavar="COL", help="Parquet column of Δt (optional)")
    ana.add_argument("--pairs", type=int, metavar="N",
                     help="random row pairs for the deltas when none are given "
                          "(default: as many as rows; ignored with given deltas)")
    ana.add_argument("--seed", type=int, default=0,
                     help="seed of the pairs, the shuffle and the plot sample")
    ana.add_argument("--out", required=True, metavar="DIR", help="output folder or URI")
    ana.add_argument("--json", action="store_true", help="print the result as JSON")


def add_edits(actions: argparse._SubParsersAction) -> None:
    ana = actions.add_parser(
        "edits", help="where are a run's edits lost? generator ceiling vs relevance mask vs mapper",
        description=_fill(EDITS_DESCRIPTION), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_fill("needs the run's stores as the demo makes them: codes and clip_images "
                     "(preprocess), <root>/mapper/mapper.safetensors (train-mapper), "
                     "relevance_<mode> when tau > 0 (relevance), and an attribute classifier.",
                     "reading the tables: a low conv_only is the generator's limit; a high acc at "
                     "tau 0 and a low one at the run's tau is the mask's; low at both under a high "
                     "conv_only is the mapper's.",
                     "example: deltaedit analyze edits -c configs/toy.yaml --images 32"))
    ana.add_argument("--config", "-c",
                     help="YAML config file of the run (default: built-in defaults)")
    ana.add_argument("overrides", nargs="*", metavar="key.path=value",
                     help="override config fields, values parsed as YAML (e.g. bulk_edit.tau=0.2)")
    ana.add_argument("--images", type=int, default=32, metavar="N",
                     help="edit the first N inverted images of the run, in bulk-edit's order "
                          "(default: 32)")
    ana.add_argument("--samples", type=int, default=32, metavar="N",
                     help="generator samples per attribute value for the ceiling (default: 32)")
    ana.add_argument("--classifier", metavar="SPEC",
                     help="attribute classifier: 'toy' (default: the oracle of evaluate.oracle) or "
                          "module:function, called as function(cfg, device) → "
                          "(images in [-1, 1] → {attribute: labels})")
    ana.add_argument("--counterfactuals", metavar="SPEC",
                     help="counterfactual codes for the ceiling: 'toy' (default with the toy "
                          "classifier: models/toy/counterfactual.py), 'none' (skip the ceiling) or "
                          "module:function, called as function(generator, n, seed) → provider "
                          "(tasks/edit_analysis.py: CounterfactualProvider)")
    ana.add_argument("--seed", type=int,
                     help="seed of the ceiling's samples (default: the config's)")
    ana.add_argument("--out", metavar="DIR",
                     help="folder or URI for analysis.json / analysis.md "
                          "(default: <root>/analysis)")
    ana.add_argument("--json", action="store_true", help="print the result as JSON")


EDIT_DESCRIPTION = (
    "Edit your own images with text prompts: each PATH is read, checked and fitted to the "
    "generator's size as the ingest stage does (ingest.resize), inverted by e4e, embedded by CLIP "
    "and edited by the bulk-edit stage's code (Δt, the mapper, the relevance mask, the decoder), "
    "with the run's trained mapper and relevance matrix. Writes "
    "<out>/<stem>__<target>__<method>.png per edit and <out>/edits.json (what was done to each "
    "input and edit, and why any failed); prints where each output went. A bad input "
    "(unreadable, too small, an empty or too long prompt, an unknown method) fails only its own edits; the exit status is 1 when any failed.")


def add_edit(sub: argparse._SubParsersAction) -> None:
    """`edit PATH... --prompt TEXT --out DIR`: flows/editor.py's Editor from the command line."""
    edit = sub.add_parser(
        "edit", help="edit your own images with text prompts (files in, files out)",
        description=_fill(EDIT_DESCRIPTION), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_fill("the toy domain works out of the box once `deltaedit demo` (make demo) has "
                     "trained the run's mapper, from the repository root:",
                     "deltaedit toy render 4 --out toy_photos && deltaedit edit toy_photos/*.png "
                     "--prompt 'a red shape' --prompt 'a shape -> a square' --out edited"))
    edit.add_argument("paths", nargs="+", metavar="PATH",
                      help="image files or URIs, any size and aspect ratio (key.path=value config "
                           "overrides may stand among them)")
    edit.add_argument("--prompt", "-p", action="append", required=True, metavar="TEXT",
                      help="'source -> target', or a target alone (its source: --source); "
                           "repeatable")
    edit.add_argument("--source", metavar="TEXT",
                      help="source text of the prompts given as a target alone (default: the "
                           "source most of the config's bulk_edit.prompts use; 'a shape' on the "
                           "toy)")
    edit.add_argument("--method", "-m", action="append", metavar="NAME",
                      help="deltaedit (default), straightforward or styleclip_gd; repeatable")
    edit.add_argument("--decoder", action="append", metavar="NAME",
                      help="generator (default), diffusion or diffusion_masked; repeatable")
    edit.add_argument("--strength", type=float, default=1.0, help="edit strength (default: 1)")
    edit.add_argument("--tau", type=float,
                      help="relevance threshold (default: bulk_edit.tau, under "
                           "bulk_edit.threshold)")
    edit.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    edit.add_argument("--config", "-c", default=str(TOY_CONFIG),
                      help="YAML config of the run whose models edit (default: configs/toy.yaml)")
    edit.add_argument("--seed", type=int, default=0, help="seed of the call (default: 0)")
    edit.add_argument("--reconstruction", action="store_true",
                      help="also write each input's inversion G(s) as <stem>__recon.png")
    edit.add_argument("--json", action="store_true", help="print edits.json instead of lines")
    edit.set_defaults(overrides=[])


def add_export(sub: argparse._SubParsersAction) -> None:
    """`export ROOT --to DIR`: tasks/export.py from the command line."""
    exp = sub.add_parser(
        "export", help="write a run's edits as files named after your source images",
        description="Write the edits of a bulk-edit run (a bulk_edit.catalog's, else the run's own) "
                    "as <source path without extension>/<prompt id>__<method>[__<decoder>].<ext> "
                    "under --to (a folder or URI), source paths taken relative to the catalog's "
                    "folder, with a manifest joining source URI, prompt, texts, method, decoder, "
                    "tau, strength and the evaluate stage's metrics of each edit.")
    exp.add_argument("root", help="run root (local path or URI such as s3://bucket/run)")
    exp.add_argument("--to", required=True, metavar="DIR", help="output folder or URI (s3://...)")
    exp.add_argument("--stage", help="edits stage (default: catalog_edits if finished, else edits)")
    exp.add_argument("--original-size", action="store_true",
                     help="resize each edit back to its source's size, undoing ingest's --resize")
    exp.add_argument("--resize", choices=["fit", "center_crop", "none"], default=None,
                     help="what ingest did (default: ingest.resize of --config, else fit)")
    exp.add_argument("--format", choices=["png", "jpg", "webp"], default="png", help="file format")
    exp.add_argument("--manifest", choices=["csv", "parquet"], default="csv", help="manifest format")
    exp.add_argument("--catalog-root", help="folder the source paths are taken relative to "
                                            "(default: the deepest folder holding them all)")
    exp.add_argument("--config", "-c", help="YAML config (storage_options, ingest.resize)")
    exp.add_argument("overrides", nargs="*", metavar="key.path=value")
    exp.add_argument("--quiet", "-q", action="store_true", help="print the counts only")


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)      # one line per Prefect API call otherwise
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
    from flows.registry import load_flow
    from infra.prefect_runtime import ensure_prefect_api

    load_config(args.config, args.overrides)          # fail fast, before any server starts
    try:
        flow = load_flow(args.flow)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    ensure_prefect_api()
    shards = args.shards.split(",") if args.shards else None
    result = flow(args.config, args.overrides, redo_failed=args.redo_failed, overwrite=args.overwrite,
                  shards=shards)
    if args.json:
        print(json.dumps(result, indent=1))
    failed = [s for stage in result.values() if isinstance(stage, dict) for s in stage.get("failed_shards", [])]
    return 1 if failed else 0


def cmd_flows(args: argparse.Namespace) -> int:
    from flows.registry import FLOWS

    for entry in FLOWS.values():
        print(f"{entry.name:16s} {entry.summary}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.file, args.overrides)
    print(dump_config(cfg) if args.action == "show" else f"{args.file}: valid")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from infra.fsio import Location
    from infra.store import StageStore

    root = Location(args.root)
    others = []
    for stage in root.listdir():
        store = StageStore(root, stage)
        markers = [store.marker(s) for s in store.finished()]
        if not markers:                      # a model folder, a report, a catalog: not a stage store
            others.append(stage)
            continue
        totals = {k: sum(m["counts"][k] for m in markers) for k in ("seen", "ok", "failed")}
        print(f"{stage:16s} {len(markers)} finished shards; {totals}")
    if others:
        print("other folders: " + ", ".join(others))
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from models import zoo

    if args.action == "list":
        for name in zoo.list_models():
            entry = zoo.get(name)
            print(f"{name:24s} {entry.role:10s} {entry.description}")
        return 0
    if args.target != "toy":
        print("error: `zoo train` needs a target: toy", file=sys.stderr)
        return 2
    from models.toy.bootstrap import bootstrap

    print(json.dumps(bootstrap(args.out, seed=args.seed), indent=1, default=str))
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    from models.toy.domain import render_catalog

    rows = render_catalog(args.out, args.n, seed=args.seed)
    print(f"wrote {len(rows)} images and attributes.jsonl to {args.out}")
    return 0


def cmd_relevance(args: argparse.Namespace) -> int:
    from flows.relevance import compare_relevance, format_comparison

    cfg = load_config(args.config, args.overrides)
    result = compare_relevance(cfg, args.channels, args.top_k, args.prompt)
    print(json.dumps(result, indent=1) if args.json else format_comparison(result))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    if args.action == "edits":
        return cmd_analyze_edits(args)
    import matplotlib

    matplotlib.use("Agg")
    from tasks import deltaspace as ds

    try:
        feats = ds.load_features(args.images, args.texts, args.delta_images, args.delta_texts, args.parquet,
                                 args.image_column, args.text_column, args.delta_image_column,
                                 args.delta_text_column)
        if args.pairs is not None and args.pairs < 2:
            raise ds.FeatureError(f"--pairs must be at least 2, got {args.pairs}")
    except ds.FeatureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    i, t, di, dt = feats
    given = di is not None
    if not given:
        di, dt = ds.make_deltas(i, t, args.pairs or len(i), args.seed)
    result = ds.analyze(i, t, di, dt, seed=args.seed)
    result["deltas"] = "given" if given else f"{len(di)} random pairs (seed {args.seed})"
    paths = ds.write_outputs(args.out, result, ds.plot(i, t, di, dt, seed=args.seed))
    print(json.dumps(result, indent=1) if args.json else ds.format_result(result))
    print("deltas: " + result["deltas"])
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def cmd_analyze_edits(args: argparse.Namespace) -> int:
    from flows.edit_analysis import analyze_edits
    from infra.fsio import Location
    from tasks import edit_analysis as EA

    if args.images < 1 or args.samples < 1:
        print("error: --images and --samples must be at least 1", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    result = analyze_edits(cfg, args.config or "<defaults>", args.images, args.samples,
                           args.classifier, args.counterfactuals, args.seed)
    out = (Location(args.out, cfg.storage_options) if args.out
           else Location(cfg.root, cfg.storage_options).child(EA.OUT_DIR))
    paths = EA.write_outputs(out, result)
    print(json.dumps(EA.jsonable(result), indent=1) if args.json else EA.format_result(result))
    log = sys.stderr if args.json else sys.stdout       # --json: stdout is the JSON alone
    print(f"analysis took {result['seconds']:.1f} s", file=log)
    for path in paths.values():
        print(f"wrote {path}", file=log)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from flows.editor import DECODERS, Editor, save_edits
    from tasks.edit_directions import METHODS

    paths = []
    for arg in args.paths:          # argparse gives every positional to PATH; a config override is
        is_override = OVERRIDE.match(arg) and not Path(arg).exists()     # key.path=value
        (args.overrides if is_override else paths).append(arg)
    if not paths:
        print("error: no image PATH given", file=sys.stderr)
        return 2
    methods, decoders = args.method or ["deltaedit"], args.decoder or ["generator"]
    editor = Editor.from_config(args.config, args.overrides,
                                methods=[m for m in dict.fromkeys(methods) if m in METHODS],
                                decoders=[d for d in dict.fromkeys(decoders) if d in DECODERS],
                                neutral_source=args.source)
    result = editor.edit(paths, args.prompt, method=methods, strength=args.strength, tau=args.tau,
                         decoder=decoders, seed=args.seed, progress=sys.stderr.isatty())
    written = save_edits(result, args.out, reconstructions=args.reconstruction)
    out = Path(args.out) / "edits.json"
    if args.json:
        print(out.read_text())
        return 1 if result.failures else 0
    print(result.requirements)
    for r in result.inputs:
        if r.ok:
            print(f"{r.source}: {r.done}; inversion PSNR {r.inversion_psnr:.1f} dB")
        else:
            print(f"error: {r.source}: {r.error}", file=sys.stderr)
    for n, e in enumerate(result.edits):
        what = f"{e.source}: {e.prompt} [{e.method}" + (
            "]" if e.decoder == "generator" else f", {e.decoder}]")
        if n in written:
            tau = "-" if e.tau is None else f"{e.tau:g}"
            print(f"{what} -> {written[n]} ({e.channels_changed} channels changed, tau {tau})")
        elif result.inputs[e.image_index].ok:
            print(f"error: {what}: {e.error}", file=sys.stderr)
    failed = len(result.failures)
    print(f"{len(written)} edits written to {args.out}, {failed} failed; details in {out}")
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from tasks.export import ExportError, export_edits

    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
    resize = args.resize or (cfg.ingest.resize if cfg is not None else "fit")
    try:
        result = export_edits(args.root, args.to, stage=args.stage, original_size=args.original_size,
                              fmt=args.format, manifest=args.manifest, resize=resize,
                              root_of_catalog=args.catalog_root,
                              storage_options=cfg.storage_options if cfg is not None else None)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        for row in result.written:
            print(f"{row['source']} [{row['prompt_id']}, {row['method']}] -> {row['uri']}")
    for key, why in result.skipped.items():
        print(f"skipped {key}: {why}", file=sys.stderr)
    print(f"{len(result.written)} edits of {result.stage} exported to {args.to} "
          f"(sources relative to {result.catalog_root or '.'}), {len(result.skipped)} skipped; "
          f"manifest {result.manifest}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from infra.demo import run_demo

    return run_demo()


COMMANDS = {"run": cmd_run, "flows": cmd_flows, "config": cmd_config, "store": cmd_store, "zoo": cmd_zoo,
            "toy": cmd_toy, "demo": cmd_demo, "relevance": cmd_relevance,
            "analyze": cmd_analyze, "edit": cmd_edit, "export": cmd_export}

if __name__ == "__main__":
    sys.exit(main())
