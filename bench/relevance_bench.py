"""Relevance matrix speed and agreement (issue: relevance matrix for any generator, fast).

Fast (reverse-mode Jacobian, models/relevance.py) against exact (StyleCLIP's ±5σ renders, batched,
tasks/relevance.py) on the same generator, CLIP, statistics and images, in this one process:

1. speed ratio: exact time for every channel (measured on a seeded subset of channels across all
   layers and scaled up: its cost is linear in channels) / fast time for the whole matrix   → ≥ 20
2. mean row cosine between the exact and fast rows of the subset                           → ≥ 0.95
   (also printed: the minimum, and the top-k channel overlap of |Rₛ·Δt| for a few prompts)
Each fast setting is measured: the full Jacobian (rank 0) and a low-rank one (relevance.fast_rank).

Models: a toy-sized generator (64 px, 800 conv channels) and toy-sized CLIP (64 px, 64-d) with random
weights; and the trained toy models of zoo/toy when they exist.
Measured on a 2-core CPU (exact on 64 channels; ratios vary ±20% with the load):
  random weights, 32 images (2026-11-23):  full Jacobian 20.7-23.5x, cosine 0.977; rank 16: 45-46x, 0.968
                              (noise floor 0.625)
  trained toy models of 2026-11-24 (generator fitted to attribute codes, zoo/toy/README.md):
    32 images:   full 19.2x, cosine 0.954; rank 16: 40.4x, 0.936; rank 32: 29.8x, 0.950; rank 40: 27.3x, 0.952
                 (noise floor 0.490)
    100 images:  full 19.6x, cosine 0.968; rank 32: 36.6x, 0.965; rank 40: 29.5x, 0.966 (noise floor 0.706)
  the previous trained toy generator, 100 images: full 17.9x, cosine 0.814 (noise floor 0.476)
The noise floor is the cosine between exact rows of two disjoint halves of the images. How well the
tangent follows the ±5σ secant depends on the models (see models/relevance.py): the retrained toy
generator responds far more linearly than the previous one.
Run: OMP_NUM_THREADS=1 .venv/bin/python bench/relevance_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.clip import ClipEncoder  # noqa: E402
from models.relevance import compare_rows, freeze, style_statistics, subset_channels, timed_exact  # noqa: E402
from models.stylegan2 import Generator  # noqa: E402
from models.toy.train_clip import TOY_CLIP_CONFIG  # noqa: E402

TOY_G = dict(size=64, style_dim=64, n_mlp=4, channels={4: 128, 8: 128, 16: 64, 32: 64, 64: 32})
PROMPTS = [
    "a circle -> a square",
    "a shape -> a red shape",
    "a shape -> a large shape",
    "a shape -> a shape on the left",
]


def random_models() -> tuple[Generator, ClipEncoder]:
    torch.manual_seed(0)
    return Generator(**TOY_G), ClipEncoder.load("toy", model_config=TOY_CLIP_CONFIG)


def trained_models() -> tuple[Generator, ClipEncoder] | None:
    """The zoo/toy models; while only the CLIP is trained, it with the random toy-sized generator."""
    g, c = REPO / "zoo/toy/generator.safetensors", REPO / "zoo/toy/clip.safetensors"
    if not c.exists():
        return None
    G = Generator.from_checkpoint(str(g)) if g.exists() else random_models()[0]
    return G, ClipEncoder.load(checkpoint=str(c))


def measure(name: str, G: Generator, clip: ClipEncoder, args: argparse.Namespace) -> None:
    freeze(G, clip.model)
    stats = style_statistics(G, args.stat_samples, args.images, seed=0)
    channels = subset_channels(G.layout.conv_total, args.channels, seed=0)
    deltas = {p: clip.delta_text(*(s.strip() for s in p.split("->"))) for p in PROMPTS}
    exact = timed_exact(G, clip, stats, channels, 5.0, args.batch_size)
    print(
        f"\n== {name}: {G.layout.conv_total} conv channels, CLIP dim {clip.embed_dim}, "
        f"{args.images} images; exact {exact[1]:.1f}s for {len(channels)} channels "
        f"(→ {exact[1] * G.layout.conv_total / len(channels):.1f}s for all)"
    )
    print(
        f"  noise floor: exact rows from one half of the images vs the other, mean cosine {exact[2]:.3f}"
    )
    for rank in args.ranks:
        r = compare_rows(
            G,
            clip,
            stats,
            channels,
            5.0,
            (args.batch_size, args.jacobian_batch),
            deltas,
            args.top_k,
            rank,
            exact,
        )
        print(
            f"  fast, {'full Jacobian' if not rank else f'rank {rank}'}: {r['seconds_fast_all']:.1f}s for all"
        )
        _line("speed ratio fast vs exact", r["speed_ratio"], 20, "x")
        _line("mean row cosine fast vs exact", r["mean_row_cosine"], 0.95, "")
        print(
            f"    min row cosine {r['min_row_cosine']:.3f}; top-{args.top_k} overlap of |Rs·Δt| per prompt: "
            + ", ".join(f"{v:.2f}" for v in r["top_k_overlap"].values())
        )


def _line(label: str, value: float, target: float, unit: str) -> None:
    flag = "ok" if value >= target else "BELOW TARGET"
    print(f"    {label:38s} {value:8.3f}{unit}  (target >= {target}{unit})  {flag}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer images and channels (a smoke run)"
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64, help="channels computed exactly")
    parser.add_argument("--stat-samples", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=32, help="exact: renders per forward")
    parser.add_argument(
        "--jacobian-batch", type=int, default=8, help="fast: images per Jacobian pass"
    )
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument(
        "--ranks",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[0, 16, 32],
        help="fast-mode ranks to measure, 0 = full Jacobian (default: 0,16,32)",
    )
    parser.add_argument("--only", choices=["random", "trained"], help="one model pair only")
    args = parser.parse_args()
    if args.quick:
        args.images, args.channels = 4, 24
    torch.set_num_threads(1)  # one CPU, as one actor gets
    pairs = {"random": ("toy-sized, random weights", random_models)}
    trained_g = (
        "trained" if (REPO / "zoo/toy/generator.safetensors").exists() else "random toy-sized"
    )
    pairs["trained"] = (f"trained toy CLIP + {trained_g} generator (zoo/toy)", trained_models)
    for key, (name, make) in pairs.items():
        if args.only and key != args.only:
            continue
        models = make()
        if models is None:
            print(f"\n== {name}: zoo/toy/clip.safetensors not found; skipped")
            continue
        measure(name, *models, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
