"""Invert stage speed (issue: preprocessing), with the toy e4e-style encoder and generator (zoo/toy):

1. stage vs bare forward (encoder → style space → reconstruction, on pre-decoded tensors)  → ≥ 0.85
2. stage vs a naive one-image-at-a-time loop                                               → ≥ 2
3. a pool of 2 actors vs 1 actor (1 CPU each) over 4 shards                                 → ≥ 1.6

Run: .venv/bin/python bench/invert_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from actor_scaling import actor_scaling  # noqa: E402
from common import best_of_each, decoded_images, image_store, report, stage_runner  # noqa: E402

from infra.readers import decode_image  # noqa: E402
from models.e4e import Encoder  # noqa: E402
from tasks.invert import InvertProcessor  # noqa: E402


TOY_ENCODER = Path(__file__).resolve().parents[1] / "zoo" / "toy" / "encoder.safetensors"


def toy_models() -> Encoder:
    """The embedded default's encoder with its paired generator (zoo/toy)."""
    return Encoder.from_checkpoint(str(TOY_ENCODER)).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, bs = (64, 16) if args.quick else (256, 32)
    enc = toy_models()
    gen = enc.generator
    with tempfile.TemporaryDirectory() as tmp_dir, torch.no_grad():
        tmp = Path(tmp_dir)
        store = image_store(tmp / "src", n, 64, shard_size=n // 4)
        processor = InvertProcessor(enc, gen, store, bs, keep_wplus=False, device="cpu")
        stage = stage_runner(processor, store, tmp, "codes")
        pngs, tensors = decoded_images(store)
        batches = tensors.split(bs)

        def forward(x: torch.Tensor) -> None:
            gen.synthesize(gen.style_space(enc(x)))

        def bare() -> None:
            for b in batches:
                forward(b)

        def naive() -> None:
            for p in pngs:
                forward(decode_image(p)[None])

        t = best_of_each({"stage": stage, "bare": bare, "naive": naive})   # in turn: load drift hits all
        t_stage, t_bare, t_naive = t["stage"], t["bare"], t["naive"]
        ckpt = str(tmp / "e.safetensors")
        enc.save(ckpt)
        rows = [("stage vs bare forward on decoded tensors", t_bare / t_stage, 0.85),
                ("stage vs naive one-image-at-a-time loop", t_naive / t_stage, 2.0),
                ("2 actors vs 1 actor over 4 shards", actor_scaling("invert", ckpt, str(tmp / "src"), bs), 1.6)]
    return 0 if report(f"invert: toy encoder + generator (64 px), batch {bs}, {n} images", rows) else 1


if __name__ == "__main__":
    sys.exit(main())
