"""`deltaedit analyze deltaspace | edits`: the analyses' parsers and commands."""

from __future__ import annotations

import argparse
import json
import sys

from app.cli_help import fill
from infra.config import load_config

ANALYZE_DESCRIPTION = (
    "`analyze deltaspace`: DeltaEdit's premise, measured on paired CLIP features. CLIP image and "
    "text embeddings are not aligned across modalities, but their differences (Δi, Δt) are. "
    "Reports, in raw space (i, t) and in delta space (Δi, Δt): the mean cosine of paired rows "
    "against a seeded shuffled-pairs baseline; image→text retrieval top-1/top-5 with chance level; "
    "the modality gap (distance between the centroids of the L2-normalised image and text rows, "
    "Liang et al. 2022) and the mean cross-modal cosine. Writes deltaspace.json and a PCA plot "
    "(deltaspace.png/.svg, like the paper's Fig. 1) to --out."
)
EDITS_DESCRIPTION = (
    "`analyze edits`: where a run's edits are lost, per attribute and per prompt. (1) The S-space "
    "ceiling of the generator: for sample codes and each attribute value, a counterfactual code "
    "that differs only in that attribute; its conv styles with the sample's toRGB styles "
    "(conv_only: what DeltaEdit can reach), its toRGB styles alone (rgb_only) and the whole code "
    "(full_swap) are decoded and read by the attribute classifier; when bulk_edit.decoder "
    "includes DeltaEdit-D, the diffusion column is its decoding of the conv_only code (G(s) "
    "DDIM-encoded under s, decoded with the run's bulk_edit.diffusion settings). (2) Per prompt of "
    "bulk_edit.prompts: the channels the run's relevance threshold keeps, and DeltaEdit's edit "
    "accuracy and preservation on the run's inverted images at tau = 0 (mask off) and at the run's "
    "tau, computed by the bulk-edit stage's code and scored as the evaluate stage scores. Prints "
    "the tables and writes analysis.json and analysis.md to <root>/analysis (the evaluate report "
    "includes them when present)."
)


def add_analyze(sub: argparse._SubParsersAction) -> None:
    """`analyze deltaspace` and `analyze edits`, each with its own flags (`analyze ACTION -h`)."""
    ana = sub.add_parser(
        "analyze",
        help="analyses: deltaspace (are CLIP image/text deltas aligned?), edits (where "
        "is an edit lost: generator ceiling, relevance mask or mapper?)",
        description=fill(ANALYZE_DESCRIPTION, EDITS_DESCRIPTION),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="actions (`deltaedit analyze ACTION --help` describes each flag):\n"
        "  deltaspace --images I.npy --texts T.npy [--delta-images DI.npy "
        "--delta-texts DT.npy]\n"
        "             [--parquet F.parquet ...] [--pairs N] [--seed S] --out DIR [--json]\n"
        "  edits -c CONFIG [key=value ...] [--images N] [--samples N] [--classifier SPEC]\n"
        "             [--counterfactuals SPEC] [--seed S] [--out DIR] [--json]",
    )
    actions = ana.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_deltaspace(actions)
    add_edits(actions)


def add_deltaspace(actions: argparse._SubParsersAction) -> None:
    ana = actions.add_parser(
        "deltaspace",
        help="are CLIP image and text deltas aligned? (paired features)",
        description=ANALYZE_DESCRIPTION,
        epilog="inputs: .npy files of shape (rows, dim), or one Parquet table with vector columns "
        "(list or fixed_size_list); local paths or fsspec URIs. Row r of the image and text "
        "features must describe the same pair. Without delta features, Δi = i[a] − i[b] and "
        "Δt = t[a] − t[b] are formed from --pairs seeded random row pairs (a ≠ b), as "
        "DeltaEdit does.",
    )
    ana.add_argument("--images", metavar="I.npy", help="image features, one row per pair")
    ana.add_argument("--texts", metavar="T.npy", help="text features, same rows as --images")
    ana.add_argument(
        "--delta-images", metavar="DI.npy", help="image deltas Δi (optional, with --delta-texts)"
    )
    ana.add_argument(
        "--delta-texts", metavar="DT.npy", help="text deltas Δt, same rows as --delta-images"
    )
    ana.add_argument(
        "--parquet", metavar="F.parquet", help="read every feature from this table instead"
    )
    ana.add_argument(
        "--image-column",
        default="image",
        metavar="COL",
        help="Parquet column of image vectors (default: image)",
    )
    ana.add_argument(
        "--text-column",
        default="text",
        metavar="COL",
        help="Parquet column of text vectors (default: text)",
    )
    ana.add_argument("--delta-image-column", metavar="COL", help="Parquet column of Δi (optional)")
    ana.add_argument("--delta-text-column", metavar="COL", help="Parquet column of Δt (optional)")
    ana.add_argument(
        "--pairs",
        type=int,
        metavar="N",
        help="random row pairs for the deltas when none are given "
        "(default: as many as rows; ignored with given deltas)",
    )
    ana.add_argument(
        "--seed", type=int, default=0, help="seed of the pairs, the shuffle and the plot sample"
    )
    ana.add_argument("--out", required=True, metavar="DIR", help="output folder or URI")
    ana.add_argument("--json", action="store_true", help="print the result as JSON")


def add_edits(actions: argparse._SubParsersAction) -> None:
    ana = actions.add_parser(
        "edits",
        help="where are a run's edits lost? generator ceiling vs relevance mask vs mapper",
        description=fill(EDITS_DESCRIPTION),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=fill(
            "needs the run's stores as the demo makes them: codes and clip_images "
            "(preprocess), <root>/mapper/mapper.safetensors (train-mapper), "
            "relevance_<mode> when tau > 0 (relevance), and an attribute classifier.",
            "reading the tables: a low conv_only is the generator's limit; a high acc at "
            "tau 0 and a low one at the run's tau is the mask's; low at both under a high "
            "conv_only is the mapper's; diffusion below conv_only is DeltaEdit-D's decoder's.",
            "example: deltaedit analyze edits -c configs/toy.yaml --images 32",
        ),
    )
    ana.add_argument(
        "--config", "-c", help="YAML config file of the run (default: built-in defaults)"
    )
    ana.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="override config fields, values parsed as YAML (e.g. bulk_edit.tau=0.2)",
    )
    ana.add_argument(
        "--images",
        type=int,
        default=32,
        metavar="N",
        help="edit the first N inverted images of the run, in bulk-edit's order (default: 32)",
    )
    ana.add_argument(
        "--samples",
        type=int,
        default=32,
        metavar="N",
        help="generator samples per attribute value for the ceiling (default: 32)",
    )
    ana.add_argument(
        "--classifier",
        metavar="SPEC",
        help="attribute classifier: 'toy' (default: the oracle of evaluate.oracle) or "
        "module:function, called as function(cfg, device) → "
        "(images in [-1, 1] → {attribute: labels})",
    )
    ana.add_argument(
        "--counterfactuals",
        metavar="SPEC",
        help="counterfactual codes for the ceiling: 'toy' (default with the toy "
        "classifier: models/toy/counterfactual.py), 'none' (skip the ceiling) or "
        "module:function, called as function(generator, n, seed) → provider "
        "(tasks/analysis/edits.py: CounterfactualProvider)",
    )
    ana.add_argument(
        "--seed", type=int, help="seed of the ceiling's samples (default: the config's)"
    )
    ana.add_argument(
        "--out",
        metavar="DIR",
        help="folder or URI for analysis.json / analysis.md (default: <root>/analysis)",
    )
    ana.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_analyze(args: argparse.Namespace) -> int:
    if args.action == "edits":
        return cmd_analyze_edits(args)
    import matplotlib

    matplotlib.use("Agg")
    from tasks.analysis import (
        deltaspace as ds,  # deferred: loaded only by the command that needs it
    )

    try:
        feats = ds.load_features(
            args.images,
            args.texts,
            args.delta_images,
            args.delta_texts,
            args.parquet,
            args.image_column,
            args.text_column,
            args.delta_image_column,
            args.delta_text_column,
        )
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
    from flows.edit_analysis import (
        analyze_edits,  # deferred: loaded only by the command that needs it
    )
    from infra.storage.fsio import Location
    from tasks.analysis import edits as EA
    from tasks.layout import ANALYSIS_DIR

    if args.images < 1 or args.samples < 1:
        print("error: --images and --samples must be at least 1", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    result = analyze_edits(
        cfg,
        args.config or "<defaults>",
        args.images,
        args.samples,
        args.classifier,
        args.counterfactuals,
        args.seed,
    )
    out = (
        Location(args.out, cfg.storage_options)
        if args.out
        else Location(cfg.root, cfg.storage_options).child(ANALYSIS_DIR)
    )
    paths = EA.write_outputs(out, result)
    print(json.dumps(EA.jsonable(result), indent=1) if args.json else EA.format_result(result))
    log = sys.stderr if args.json else sys.stdout  # --json: stdout is the JSON alone
    print(f"analysis took {result['seconds']:.1f} s", file=log)
    for path in paths.values():
        print(f"wrote {path}", file=log)
    return 0
