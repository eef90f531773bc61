"""Embed stage speed (issue: preprocessing). Three ratios, each measured in this one process:

1. stage vs bare forward: the full stage (read tar, decode PNG, preprocess, forward, write Parquet)
   against the bare model forward on pre-decoded tensors, same model and batch size    → ≥ 0.85
2. stage vs a naive loop: one image at a time, as the official scripts do                 → ≥ 2
3. a pool of 2 actors vs 1 actor (1 CPU each) over 4 shards on a 2-core machine           → ≥ 1.6

Models: the toy CLIP (zoo/toy) and open_clip ViT-B-32 with random weights (no download).
Run: .venv/bin/python bench/embed_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of_each, decoded_images, image_store, report, stage_runner  # noqa: E402

from infra.readers import decode_image  # noqa: E402
from infra.store import StageStore  # noqa: E402
from models.clip import ClipEncoder  # noqa: E402
from tasks.embed import EmbedProcessor  # noqa: E402
from actor_scaling import actor_scaling  # noqa: E402

TOY_CLIP = str(Path(__file__).resolve().parents[1] / "zoo" / "toy" / "clip.safetensors")   # the embedded default


def stage_ratios(clip: ClipEncoder, store: StageStore, batch_size: int, tmp: Path) -> list[tuple]:
    stage = stage_runner(EmbedProcessor(clip, store, batch_size), store, tmp, "clip_images")
    pngs, tensors = decoded_images(store)
    batches = tensors.split(batch_size)

    def bare() -> None:
        for b in batches:
            clip.encode_images(b, batch_size=batch_size)

    def naive() -> None:
        for p in pngs:
            clip.encode_images(decode_image(p)[None], batch_size=1)

    t = best_of_each({"stage": stage, "bare": bare, "naive": naive})   # in turn: load drift hits all
    t_stage, t_bare, t_naive = t["stage"], t["bare"], t["naive"]
    return [("stage vs bare forward on decoded tensors", t_bare / t_stage, 0.85),
            ("stage vs naive one-image-at-a-time loop", t_naive / t_stage, 2.0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)                 # one CPU, as one actor gets
    ok = True
    models = [("toy CLIP (zoo/toy, 64 px)", {"checkpoint": TOY_CLIP}, 64, 256, 64),
              ("ViT-B-32, random weights (224 px)", {"name": "ViT-B-32"}, 224, 64, 16)]
    with tempfile.TemporaryDirectory() as tmp_dir:
        for title, kwargs, size, n, bs in models:
            n = n // 4 if args.quick else n
            tmp = Path(tmp_dir) / title.split()[0]
            torch.manual_seed(0)
            clip = ClipEncoder.load(**kwargs)
            store = image_store(tmp / "src", n, size, shard_size=n // 4)
            rows = stage_ratios(clip, store, bs, tmp)
            ckpt = str(tmp / "clip.safetensors")
            clip.save(ckpt)
            rows.append(("2 actors vs 1 actor over 4 shards",
                         actor_scaling("embed", ckpt, str(tmp / "src"), bs), 1.6))
            ok &= report(f"embed: {title}, batch {bs}, {n} images", rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
