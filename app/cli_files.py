"""`deltaedit edit` (your own images, files in and out) and `deltaedit export` (a run's edits under the
users' own file names): parsers and commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.cli_help import OVERRIDE, TOY_CONFIG, fill
from infra.config import load_config

EDIT_DESCRIPTION = (
    "Edit your own images with text prompts: each PATH is read, checked and fitted to the "
    "generator's size as the ingest stage does (ingest.resize), inverted by e4e, embedded by CLIP "
    "and edited by the bulk-edit stage's code (Δt, the mapper, the relevance mask, the decoder), "
    "with the run's trained mapper and relevance matrix. Writes "
    "<out>/<stem>__<target>__<method>.png per edit and <out>/edits.json (what was done to each "
    "input and edit, and why any failed); prints where each output went. A bad input "
    "(unreadable, too small, an empty or too long prompt, an unknown method) fails only its own edits; the exit status is 1 when any failed."
)


def add_edit(sub: argparse._SubParsersAction) -> None:
    """`edit PATH... --prompt TEXT --out DIR`: flows/editor.py's Editor from the command line."""
    edit = sub.add_parser(
        "edit",
        help="edit your own images with text prompts (files in, files out)",
        description=fill(EDIT_DESCRIPTION),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=fill(
            "the toy domain works out of the box once `deltaedit demo` (make demo) has "
            "trained the run's mapper, from the repository root:",
            "deltaedit toy render 4 --out toy_photos && deltaedit edit toy_photos/*.png "
            "--prompt 'a red shape' --prompt 'a shape -> a square' --out edited",
        ),
    )
    edit.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files or URIs, any size and aspect ratio (key.path=value config "
        "overrides may stand among them)",
    )
    edit.add_argument(
        "--prompt",
        "-p",
        action="append",
        required=True,
        metavar="TEXT",
        help="'source -> target', or a target alone (its source: --source); repeatable",
    )
    edit.add_argument(
        "--source",
        metavar="TEXT",
        help="source text of the prompts given as a target alone (default: the "
        "source most of the config's bulk_edit.prompts use; 'a shape' on the "
        "toy)",
    )
    edit.add_argument(
        "--method",
        "-m",
        action="append",
        metavar="NAME",
        help="deltaedit (default), straightforward or styleclip_gd; repeatable",
    )
    edit.add_argument(
        "--decoder",
        action="append",
        metavar="NAME",
        help="generator (default), diffusion or diffusion_masked; repeatable",
    )
    edit.add_argument("--strength", type=float, default=1.0, help="edit strength (default: 1)")
    edit.add_argument(
        "--tau",
        type=float,
        help="relevance threshold (default: bulk_edit.tau, under bulk_edit.threshold)",
    )
    edit.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    edit.add_argument(
        "--config",
        "-c",
        default=str(TOY_CONFIG),
        help="YAML config of the run whose models edit (default: configs/toy.yaml)",
    )
    edit.add_argument(
        "--align",
        metavar="LANDMARKS",
        help="align each face as FFHQ's were before editing, with this TorchScript landmark "
        "model (path or URI; same as ingest.align.landmarks=LANDMARKS; docs/alignment.md)",
    )
    edit.add_argument("--seed", type=int, default=0, help="seed of the call (default: 0)")
    edit.add_argument(
        "--reconstruction",
        action="store_true",
        help="also write each input's inversion G(s) as <stem>__recon.png",
    )
    edit.add_argument("--json", action="store_true", help="print edits.json instead of lines")
    edit.set_defaults(overrides=[])


def add_export(sub: argparse._SubParsersAction) -> None:
    """`export ROOT --to DIR`: tasks/export.py from the command line."""
    exp = sub.add_parser(
        "export",
        help="write a run's edits as files named after your source images",
        description="Write the edits of a bulk-edit run (a bulk_edit.catalog's, else the run's own) "
        "as <source path without extension>/<prompt id>__<method>[__<decoder>].<ext> "
        "under --to (a folder or URI), source paths taken relative to the catalog's "
        "folder, with a manifest joining source URI, prompt, texts, method, decoder, "
        "tau, strength and the evaluate stage's metrics of each edit.",
    )
    exp.add_argument("root", help="run root (local path or URI such as s3://bucket/run)")
    exp.add_argument("--to", required=True, metavar="DIR", help="output folder or URI (s3://...)")
    exp.add_argument("--stage", help="edits stage (default: catalog_edits if finished, else edits)")
    exp.add_argument(
        "--original-size",
        action="store_true",
        help="resize each edit back to its source's size, undoing ingest's --resize",
    )
    exp.add_argument(
        "--resize",
        choices=["fit", "center_crop", "none"],
        default=None,
        help="what ingest did (default: ingest.resize of --config, else fit)",
    )
    exp.add_argument("--format", choices=["png", "jpg", "webp"], default="png", help="file format")
    exp.add_argument(
        "--manifest", choices=["csv", "parquet"], default="csv", help="manifest format"
    )
    exp.add_argument(
        "--catalog-root",
        help="folder the source paths are taken relative to "
        "(default: the deepest folder holding them all)",
    )
    exp.add_argument("--config", "-c", help="YAML config (storage_options, ingest.resize)")
    exp.add_argument("overrides", nargs="*", metavar="key.path=value")
    exp.add_argument("--quiet", "-q", action="store_true", help="print the counts only")


def cmd_edit(args: argparse.Namespace) -> int:
    from flows.editor import DECODERS, Editor  # deferred: loaded only by the command that needs it
    from flows.editor_results import save_edits
    from models.edit_directions import METHODS

    paths = []
    for arg in args.paths:  # argparse gives every positional to PATH; a config override is
        is_override = OVERRIDE.match(arg) and not Path(arg).exists()  # key.path=value
        (args.overrides if is_override else paths).append(arg)
    if not paths:
        print("error: no image PATH given", file=sys.stderr)
        return 2
    if args.align:
        args.overrides.append(f"ingest.align.landmarks={args.align}")
    methods, decoders = args.method or ["deltaedit"], args.decoder or ["generator"]
    editor = Editor.from_config(
        args.config,
        args.overrides,
        methods=[m for m in dict.fromkeys(methods) if m in METHODS],
        decoders=[d for d in dict.fromkeys(decoders) if d in DECODERS],
        neutral_source=args.source,
    )
    result = editor.edit(
        paths,
        args.prompt,
        method=methods,
        strength=args.strength,
        tau=args.tau,
        decoder=decoders,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
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
            "]" if e.decoder == "generator" else f", {e.decoder}]"
        )
        if n in written:
            tau = "-" if e.tau is None else f"{e.tau:g}"
            print(f"{what} -> {written[n]} ({e.channels_changed} channels changed, tau {tau})")
        elif result.inputs[e.image_index].ok:
            print(f"error: {what}: {e.error}", file=sys.stderr)
    failed = len(result.failures)
    print(f"{len(written)} edits written to {args.out}, {failed} failed; details in {out}")
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from tasks.export import (  # deferred: loaded only by the command that needs it
        ExportError,
        export_edits,
    )

    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
    resize = args.resize or (cfg.ingest.resize if cfg is not None else "fit")
    try:
        result = export_edits(
            args.root,
            args.to,
            stage=args.stage,
            original_size=args.original_size,
            fmt=args.format,
            manifest=args.manifest,
            resize=resize,
            root_of_catalog=args.catalog_root,
            storage_options=cfg.storage_options if cfg is not None else None,
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        for row in result.written:
            print(f"{row['source']} [{row['prompt_id']}, {row['method']}] -> {row['uri']}")
    for key, why in result.skipped.items():
        print(f"skipped {key}: {why}", file=sys.stderr)
    print(
        f"{len(result.written)} edits of {result.stage} exported to {args.to} "
        f"(sources relative to {result.catalog_root or '.'}), {len(result.skipped)} skipped; "
        f"manifest {result.manifest}"
    )
    return 0
