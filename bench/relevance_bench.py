"""Relevance matrix speed and agreement (issue: relevance matrix for any generator, fast).

Fast (reverse-mode Jacobian, tasks/relevance_fast.py) against exact (StyleCLIP's ±5σ renders, batched,
tasks/relevance.py) on the same generator, CLIP, statistics and images, in this one process:

1. speed ratio: exact time for every channel (measured on a seeded subset of channels across all
   layers and scaled up: its cost is linear in channels) / fast time for the whole matrix   → ≥ 20
2. mean row cosine between the exact and fast rows of the subset                           → ≥ 0.95
   (also printed: the minimum, and the top-k channel overlap of |Rₛ·Δt| for a few prompts)

Models: a toy-sized generator (64 px, 800 conv channels) and toy-sized CLIP (64 px, 64-d) with random
weights; and the trained toy models of zoo/toy when they exist.
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
from models.stylegan2 import Generator  # noqa: E402
from models.toy.train_clip import TOY_CLIP_CONFIG  # noqa: E402
from tasks.relevance import freeze, style_statistics  # noqa: E402
from tasks.relevance_fast import compare_rows, subset_channels  # noqa: E402

TOY_G = dict(size=64, style_dim=64, n_mlp=4, channels={4: 128, 8: 128, 16: 64, 32: 64, 64: 32})
PROMPTS = ["a circle -> a square", "a shape -> a red shape", "a shape -> a large shape",
           "a shape -> a shape on the left"]


def random_models() -> tuple[Generator, ClipEncoder]:
    torch.manual_seed(0)
    return Generator(**TOY_G), ClipEncoder.load("toy", model_config=TOY_CLIP_CONFIG)


def trained_models() -> tuple[Generator, ClipEncoder] | None:
    g, c = REPO / "zoo/toy/generator.safetensors", REPO / "zoo/toy/clip.safetensors"
    if not (g.exists() and c.exists()):
        return None
    return Generator.from_checkpoint(str(g)), ClipEncoder.load(checkpoint=str(c))


def measure(name: str, G: Generator, clip: ClipEncoder, args: argparse.Namespace) -> dict:
    freeze(G, clip.model)
    stats = style_statistics(G, args.stat_samples, args.images, seed=0)
    channels = subset_channels(G.layout.conv_total, args.channels, seed=0)
    deltas = {p: clip.delta_text(*(s.strip() for s in p.split("->"))) for p in PROMPTS}
    r = compare_rows(G, clip, stats, channels, 5.0, args.batch_size, deltas, args.top_k)
    print(f"\n== {name}: {G.layout.conv_total} conv channels, CLIP dim {clip.embed_dim}, "
          f"{args.images} images, exact on {len(channels)} channels")
    print(f"  exact {r['seconds_exact_subset']:.1f}s for {len(channels)} channels "
          f"(→ {r['seconds_exact_all_est']:.1f}s for all); fast {r['seconds_fast_all']:.1f}s for all")
    _line("speed ratio fast vs exact", r["speed_ratio"], 20, "x")
    _line("mean row cosine fast vs exact", r["mean_row_cosine"], 0.95, "")
    print(f"  min row cosine {r['min_row_cosine']:.3f}")
    for prompt, overlap in r["top_k_overlap"].items():
        print(f"  top-{args.top_k} overlap of |Rs·Δt| {overlap:.2f}   {prompt}")
    return r


def _line(label: str, value: float, target: float, unit: str) -> None:
    flag = "ok" if value >= target else "BELOW TARGET"
    print(f"  {label:40s} {value:8.3f}{unit}  (target >= {target}{unit})  {flag}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and channels (a smoke run)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--channels", type=int, default=64, help="channels computed exactly")
    parser.add_argument("--stat-samples", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--only", choices=["random", "trained"], help="one model pair only")
    args = parser.parse_args()
    if args.quick:
        args.images, args.channels = 4, 24
    torch.set_num_threads(1)                 # one CPU, as one actor gets
    pairs = {"random": ("toy-sized, random weights", random_models)}
    pairs["trained"] = ("trained toy models (zoo/toy)", trained_models)
    for key, (name, make) in pairs.items():
        if args.only and key != args.only:
            continue
        models = make()
        if models is None:
            print(f"\n== {name}: not found (zoo/toy/generator.safetensors, zoo/toy/clip.safetensors); skipped")
            continue
        measure(name, *models, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
