"""Embed stage speed (issue: preprocessing). Three ratios, each measured in this one process:

1. stage vs bare forward: the full stage (read tar, decode PNG, preprocess, forward, write Parquet)
   against the bare model forward on pre-decoded tensors, same model and batch size    → ≥ 0.85
   (on 4 shards of 4 batches; the same on shards of one batch is printed for reference)
2. stage vs a naive loop: one image at a time, as the official scripts do                 → ≥ 2
   (the bare forward batched vs batch 1 is printed for reference: batching's own gain, the
   ceiling of this ratio short of decoding; ViT-B-32 on one CPU thread gains ~1.45)
3. a pool of 2 actors vs 1 actor (one thread each) over the 4 shards on a 2-core machine  → ≥ 1.6

Models: the toy CLIP (zoo/toy) and open_clip ViT-B-32 with random weights (no download).
With --device cuda, ratios 1 and 2 run the model on the GPU (every side copies its embeddings to the
host, which also waits for the GPU); the actor comparison stays on CPU, as the target is for 2 cores.
Run: .venv/bin/python bench/embed_bench.py [--quick] [--shard-batches N] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from actor_scaling import actor_scaling  # noqa: E402
from common import SHARDS, add_layout_args, layout, report, stage_ratios  # noqa: E402

from models.clip import ClipEncoder  # noqa: E402
from tasks.embed import EmbedProcessor  # noqa: E402

TOY_CLIP = str(
    Path(__file__).resolve().parents[1] / "zoo" / "toy" / "clip.safetensors"
)  # the embedded default


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_layout_args(parser)
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the model runs for the stage, bare and naive sides (default cpu)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine")
    shard_batches, repeat = layout(args)
    torch.set_num_threads(1)  # one CPU, as one actor gets
    ok = True
    models = [
        ("toy CLIP (zoo/toy, 64 px)", {"checkpoint": TOY_CLIP}, 64, 64),
        ("ViT-B-32, random weights (224 px)", {"name": "ViT-B-32"}, 224, 16),
    ]
    with tempfile.TemporaryDirectory() as tmp_dir:
        for title, kwargs, size, bs in models:
            tmp = Path(tmp_dir) / title.split()[0]
            torch.manual_seed(0)
            clip = ClipEncoder.load(**kwargs, device=args.device)
            rows = stage_ratios(
                lambda images: EmbedProcessor(clip, images, bs),
                lambda x: clip.encode_images(x, batch_size=len(x)).cpu(),
                tmp,
                size,
                bs,
                shard_batches,
                "clip_images",
                repeat,
            )
            ckpt = str(tmp / "clip.safetensors")
            clip.save(ckpt)
            rows.append(
                (
                    f"2 actors vs 1 actor over the {SHARDS} shards",
                    actor_scaling("embed", ckpt, str(tmp / "src"), bs),
                    1.6,
                )
            )
            ok &= report(
                f"embed: {title}, batch {bs}, {SHARDS} shards of {shard_batches * bs} images", rows
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
