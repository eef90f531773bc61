"""Edit stage memory (issue 25, item 4): peak RSS of one edit shard at 100 prompts vs at 10       → ≤ 1.2

OURS: ``EditProcessor`` via ``execute_shard`` as an actor runs it: each finished edit is encoded and
streamed into the shard writer (``ShardWriter``: a temporary tar, published atomically at commit), so only a
batch of renders is held at a time.
BASELINE, the stage as it was (in memory): the same processor and the same shard, but every encoded edit of
the shard is held until the shard ends and only then written (here: into a ``MemorySink``, then replayed
into the writer), which is what the processor did before.

Each side and prompt count runs in a fresh process (peak RSS, ``ru_maxrss``, is per process). Models: a
random-weight StyleGAN2 generator at ``--size`` px (default 256: noisy images, ~190 KB a PNG, as large
photos are), the toy CLIP (zoo/toy) for Δt, a random Delta Mapper; ``--images`` images in one shard; one
method (deltaedit); prompts distinct texts. The figure is peak(100 prompts) / peak(10 prompts) per side.

Run: .venv/bin/python bench/edit_memory_bench.py [--quick] [--images N] [--size PX] [--prompts A B]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (offline defaults, as the CLI runs)

ZOO = Path(__file__).resolve().parents[1] / "zoo" / "toy"
TARGET = 1.2


def child(side: str, n_images: int, n_prompts: int, size: int) -> dict:
    """One shard of ``n_images`` × ``n_prompts`` edits in this process; returns its peak RSS figures."""
    import hashlib

    import torch

    from infra.config import BulkEditConfig
    from infra.runtime.stage import execute_shard
    from infra.storage.fsio import Location
    from infra.storage.records import MemorySink
    from infra.storage.store import StageStore
    from models.clip import ClipEncoder
    from models.delta_mapper import DeltaMapper, MapperConfig
    from models.stylegan2 import Generator
    from tasks.edit.processor import EditModels, EditProcessor, plan_edits
    from tasks.prompts import EditVariant

    torch.set_num_threads(1)
    torch.manual_seed(0)
    channels = {r: c for r, c in {4: 64, 8: 64, 16: 32, 32: 32, 64: 16}.items() if r <= size}
    channels.update({r: 8 for r in (128, 256, 512, 1024) if r <= size})
    G = Generator(size, style_dim=64, n_mlp=2, channels=channels).eval()
    clip = ClipEncoder.load(checkpoint=str(ZOO / "clip.safetensors"), device="cpu")
    mapper = DeltaMapper(MapperConfig(layout=G.layout.to_dict(), clip_dim=clip.embed_dim)).eval()
    models = EditModels(G, clip, {"deltaedit": mapper}, None, None)

    root = Location(tempfile.mkdtemp(prefix="edit-memory-"))
    with torch.no_grad():
        code = G.style_space(G.mapping(torch.randn(n_images, G.style_dim)))
    emb = torch.nn.functional.normalize(torch.randn(n_images, clip.embed_dim), dim=-1)
    keys = [f"img_{i:05d}" for i in range(n_images)]
    for stage, vectors in (
        ("codes", {"s": code.conv.numpy(), "s_rgb": code.rgb.numpy()}),
        ("clip_images", {"embedding": emb.numpy()}),
    ):
        writer = StageStore(root, stage).writer("00000", {})
        for n, key in enumerate(keys):
            writer.add(key, key, vectors={k: v[n] for k, v in vectors.items()})
        writer.commit(input_fingerprint=stage, code_fingerprint="bench")
    colours = [f"colour {n}" for n in range(n_prompts)]
    variants = [
        EditVariant(f"p{n:03d}", (("a shape", f"a {c} shape", 1.0),), tau=0.0)
        for n, c in enumerate(colours)
    ]
    cfg = BulkEditConfig(templates="none", images_per_shard=n_images, batch_size=16)
    codes = StageStore(root, "codes")
    (spec,) = plan_edits(codes, variants, ["deltaedit"], cfg)
    assert len(spec.items) == n_images * (n_prompts + 1)
    del code, emb
    processor = EditProcessor(models, codes, StageStore(root, "clip_images"), cfg)
    out = StageStore(root, "edits")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if side == "ours":
        execute_shard(processor, spec, out, "bench")
    else:  # every encoded edit of the shard held until its end, then written
        held = MemorySink()
        processor(spec, held)
        writer = out.writer(spec.shard_id, processor.output_metadata)
        for record in held.records:
            writer.put(record)
        writer.commit(input_fingerprint=spec.fingerprint, code_fingerprint="bench")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tar = Path(root.path) / "edits" / f"{spec.shard_id}.tar"
    return {
        "side": side,
        "prompts": n_prompts,
        "edits": len(spec.items),
        "peak_mb": round(peak, 1),
        "before_mb": round(before, 1),
        "tar_mb": round(tar.stat().st_size / 2**20, 1),
        "seconds": round(seconds, 1),
        "tar_sha256": hashlib.sha256(tar.read_bytes()).hexdigest()[:16],
    }


def run_child(side: str, images: int, prompts: int, size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", side, str(prompts), "--images", str(images)]
    out = subprocess.run(
        [*cmd, "--size", str(size)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--prompts", type=int, nargs=2, default=[10, 100])
    parser.add_argument("--quick", action="store_true", help="16 images of 128 px (a smoke run)")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "PROMPTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.images, args.size = 16, 128
    if args.child:
        print(json.dumps(child(args.child[0], args.images, int(args.child[1]), args.size)))
        return 0
    few, many = args.prompts
    print(
        f"edit stage peak RSS: {args.images} images of {args.size} px in one shard, 1 method, "
        f"{few} vs {many} prompts (one process each)"
    )
    runs = {(side, p): run_child(side, args.images, p, args.size) for p in (few, many)
            for side in ("ours", "in-memory")}  # fmt: skip
    for r in runs.values():
        print(
            f"  {r['side']:10s} {r['prompts']:4d} prompts: {r['edits']:6d} edits, tar {r['tar_mb']:7.1f} MB, "
            f"RSS before the shard {r['before_mb']:7.1f} MB, peak {r['peak_mb']:7.1f} MB, "
            f"{r['seconds']:6.1f} s, tar {r['tar_sha256']}"
        )
    same = all(
        runs["ours", p]["tar_sha256"] == runs["in-memory", p]["tar_sha256"] for p in (few, many)
    )
    print(f"  same shard bytes on both sides: {same}")
    ok = same
    print(f"\n== peak RSS at {many} prompts / at {few} prompts")
    for side in ("ours", "in-memory"):
        ratio = runs[side, many]["peak_mb"] / runs[side, few]["peak_mb"]
        met = ratio <= TARGET
        ok &= met or side != "ours"
        note = f"(target <= {TARGET}x)  {'ok' if met else 'ABOVE TARGET'}" if side == "ours" else ""
        print(f"  {side:10s} {ratio:6.2f}x  {note}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
