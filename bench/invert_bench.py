"""Invert stage speed (issue: preprocessing), with the toy e4e-style encoder and generator (zoo/toy):

1. stage vs bare forward (encoder → style space → reconstruction, on pre-decoded tensors)  → ≥ 0.85
   (on 4 shards of 4 batches; the same on shards of one batch is printed for reference)
2. stage vs a naive one-image-at-a-time loop                                               → ≥ 2
   (the bare forward batched vs batch 1, batching's own gain, is printed for reference)
3. a pool of 2 actors vs 1 actor (one thread each) over the 4 shards                        → ≥ 1.6

Run: .venv/bin/python bench/invert_bench.py [--quick] [--shard-batches N]
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

from models.e4e import Encoder  # noqa: E402
from tasks.invert import InvertProcessor  # noqa: E402

TOY_ENCODER = Path(__file__).resolve().parents[1] / "zoo" / "toy" / "encoder.safetensors"


def toy_models() -> Encoder:
    """The embedded default's encoder with its paired generator (zoo/toy)."""
    return Encoder.from_checkpoint(str(TOY_ENCODER)).eval()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_layout_args(parser)
    args = parser.parse_args()
    shard_batches, repeat = layout(args)
    torch.set_num_threads(1)
    bs = 32
    enc = toy_models()
    gen = enc.generator
    with tempfile.TemporaryDirectory() as tmp_dir, torch.no_grad():
        tmp = Path(tmp_dir)
        rows = stage_ratios(
            lambda images: InvertProcessor(enc, gen, images, bs, keep_wplus=False, device="cpu"),
            lambda x: gen.synthesize(gen.style_space(enc(x))),
            tmp,
            64,
            bs,
            shard_batches,
            "codes",
            repeat,
        )
        ckpt = str(tmp / "e.safetensors")
        enc.save(ckpt)
        scaling = actor_scaling("invert", ckpt, str(tmp / "src"), bs)
        rows.append((f"2 actors vs 1 actor over the {SHARDS} shards", scaling, 1.6))
    title = f"invert: toy encoder + generator (64 px), batch {bs}, {SHARDS} shards of {shard_batches * bs} images"
    return 0 if report(title, rows) else 1


if __name__ == "__main__":
    sys.exit(main())
