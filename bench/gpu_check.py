"""GPU check (issue 22): the ratios a GPU machine must show, measured in one process, and the CUDA
variants of the tests. Needs torch and open_clip, NOT Ray or Prefect: it imports the project's
models/ and tasks/ processors (and bench/ helpers) directly, never flows/ or the Ray/Prefect parts
of infra/, and refuses to import ray or prefect (so it fails loudly if that ever changes).

1. embed stage (read tar → decode PNG → preprocess → CLIP → Parquet) vs the bare forward on the
   same decoded tensors, batch 256                                                    → ≥ 0.85
   ... and vs a one-image-at-a-time loop                                              → ≥ 10
2. bulk-edit processor (codes and CLIP embeddings from Parquet → Δt → mapper → Rₛ mask → G → PNG
   → tar) vs the bare G + CLIP (Δt) + mapper on tensors already on the GPU, batch 32  → ≥ 0.8
   (the models: a 1024 px StyleGAN2, ViT-B-32 and the official Delta Mapper layout, random
   weights: the cost is the architecture's, nothing is downloaded)
3. the CUDA variants of the tests: ``pytest -m gpu`` on the files that have them (needs pytest).

Run on a GPU machine:   python bench/gpu_check.py                (exit 1 if a target is missed)
Smoke run on a CPU:     python bench/gpu_check.py --device cpu --quick   (toy models, tiny sizes;
                        ratios printed for information, the CUDA tests skipped)
"""

from __future__ import annotations

import argparse
import importlib.abc
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

FORBIDDEN = ("ray", "prefect")
REPO = Path(__file__).resolve().parents[1]
GPU_TESTS = ("tests/test_stylegan2.py", "tests/test_e4e.py", "tests/test_device.py")
Row = tuple[str, float, float | None]


class ForbidImports(importlib.abc.MetaPathFinder):
    """Makes ``import ray`` / ``import prefect`` fail as on a machine without them."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] in FORBIDDEN:
            top = name.split(".")[0]
            raise ImportError(f"bench/gpu_check.py runs without {top} (something imported it)")
        return None


sys.meta_path.insert(0, ForbidImports())
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from common import best_of_each, report, stage_ratios  # noqa: E402
from edit_bench import inputs, toy_models, with_random_mapper  # noqa: E402

from infra.config import BulkEditConfig  # noqa: E402
from infra.runtime.stage import execute_shard  # noqa: E402
from infra.storage.fsio import Location  # noqa: E402
from infra.storage.store import StageStore  # noqa: E402
from models import edit_directions as ed  # noqa: E402
from models.clip import ClipEncoder  # noqa: E402
from models.stylegan2 import Generator  # noqa: E402
from tasks.edit.processor import EditModels, EditProcessor, plan_edits  # noqa: E402
from tasks.embed import EmbedProcessor  # noqa: E402
from tasks.prompts import EditVariant  # noqa: E402

TOY_CLIP = str(REPO / "zoo" / "toy" / "clip.safetensors")
VARIANT = EditVariant("red", (("a face", "a face with red hair", 1.0),), BulkEditConfig().tau)


def synced(device: str, fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a wait for the GPU, so a timing covers the work, not its launch."""

    def run() -> None:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def embed_rows(device: str, quick: bool, tmp: Path) -> list[Row]:
    """Embed stage vs bare forward (batch 256) and vs a one-image loop: ViT-B-32 (quick: toy)."""
    torch.manual_seed(0)
    if quick:
        clip, size, batch, shard_batches, repeat = (
            ClipEncoder.load(checkpoint=TOY_CLIP, device=device),
            64,
            8,
            2,
            1,
        )
    else:
        clip, size, batch, shard_batches, repeat = (
            ClipEncoder.load(name="ViT-B-32", device=device),
            224,
            256,
            2,
            2,
        )
    rows = stage_ratios(
        lambda images: EmbedProcessor(clip, images, batch),
        lambda x: clip.encode_images(x, batch_size=len(x)).cpu(),
        tmp / "embed",
        size,
        batch,
        shard_batches,
        "clip_images",
        repeat,
    )
    retarget = {"stage vs naive one-image-at-a-time loop": 10.0}
    return [(name, ratio, retarget.get(name, target)) for name, ratio, target in rows]


def paper_models(device: str) -> EditModels:
    """1024 px StyleGAN2 (FFHQ config), ViT-B-32 and a Delta Mapper of the official layout, random
    weights (their cost is the architecture's)."""
    torch.manual_seed(0)
    G = Generator(size=1024, style_dim=512, n_mlp=8).to(device).eval()
    return with_random_mapper(G, ClipEncoder.load(name="ViT-B-32", device=device))


def edit_rows(device: str, quick: bool, tmp: Path) -> list[Row]:
    """The bulk-edit processor vs bare G + CLIP (Δt) + mapper at batch 32 (toy models: quick)."""
    models = toy_models(device=device) if quick else paper_models(device)
    n, batch, repeat = (8, 4, 1) if quick else (128, 32, 2)
    cfg = BulkEditConfig(
        methods=["deltaedit"],
        reconstruction=False,
        batch_size=batch,
        images_per_shard=n // 2,
        templates="none",
    )
    with torch.no_grad():
        codes, embeddings = inputs(models, n, tmp / "edit")
    processor = EditProcessor(models, codes, embeddings, cfg)
    specs = plan_edits(codes, [VARIANT], cfg.methods, cfg)
    rows = processor._inputs(specs[0]) | processor._inputs(specs[-1])
    s, rgb, emb = (torch.stack([r[k] for r in rows.values()]).to(models.device) for k in range(3))
    runs = iter(range(10_000))

    def stage() -> None:
        store = StageStore(Location(str(tmp / "edit" / f"edits-{next(runs)}")), "edits")
        for spec in specs:
            execute_shard(processor, spec, store, "bench")

    @torch.no_grad()
    def bare() -> None:
        dt, target = ed.text_direction(models.clip, VARIANT.terms, ed.TEMPLATES[cfg.templates])
        mask = ed.relevance_mask(models.relevance, dt, cfg.tau)
        for lo in range(0, n, batch):
            part = slice(lo, lo + batch)
            mapper = models.mappers["deltaedit"]
            delta = ed.mapper_delta(mapper, "deltaedit", s[part], emb[part], dt, target)
            models.render(s[part] + delta * mask, rgb[part])

    fns = {"stage": synced(device, stage), "bare": synced(device, bare)}
    for fn in fns.values():
        fn()  # warm-up: kernels, Δt cache, allocator
    t = best_of_each(fns, repeat)
    print(
        f"  edit: {n} images, stage {t['stage'] / n * 1e3:.2f} ms/image, bare "
        f"{t['bare'] / n * 1e3:.2f} ms/image; per step at batch {batch}:"
    )
    for name, ms in step_times(models, s[:batch], rgb[:batch], emb[:batch], device, repeat).items():
        print(f"    {name:24s} {ms:8.3f} ms/image")
    name = f"bulk-edit processor vs bare G + CLIP + mapper, batch {batch}"
    return [(name, t["bare"] / t["stage"], 0.8)]


@torch.no_grad()
def step_times(
    models: EditModels,
    s: torch.Tensor,
    rgb: torch.Tensor,
    emb: torch.Tensor,
    device: str,
    repeat: int,
) -> dict[str, float]:
    """ms per image of each model on one batch (for reference)."""
    dt = emb[0] - emb[1]
    images = models.render(s, rgb)
    steps = {
        "generator": lambda: models.render(s, rgb),
        "CLIP image encoder": lambda: models.clip.encode_images(images),
        "Delta Mapper": lambda: models.mappers["deltaedit"](s, emb, dt.expand(len(s), -1)),
    }
    fns = {name: synced(device, fn) for name, fn in steps.items()}
    for fn in fns.values():
        fn()
    return {name: sec / len(s) * 1e3 for name, sec in best_of_each(fns, repeat).items()}


def cuda_tests() -> list[Row]:
    """``pytest -m gpu`` on the files with CUDA variants: one row, 1.0 when they pass."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        print("  pytest is not installed: the CUDA test variants were not run")
        return []
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        *GPU_TESTS,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    print(f"  pytest -m gpu ({time.perf_counter() - start:.0f} s):\n    " + "\n    ".join(tail))
    return [("CUDA test variants pass (1 = yes)", float(done.returncode == 0), 1.0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="toy models, tiny sizes, one round: a smoke run (no targets)",
    )
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine")
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    quick = ", quick" if args.quick else ""
    print(f"gpu_check on {args.device}{gpu}{quick}; torch {torch.__version__}")
    sections = {"embed stage": embed_rows, "bulk-edit stage": edit_rows}
    judged = args.device == "cuda" and not args.quick  # the targets are GPU targets
    ok = True
    with tempfile.TemporaryDirectory() as tmp_dir:
        for title, measure in sections.items():
            rows = measure(args.device, args.quick, Path(tmp_dir))
            ok &= report(f"{title} on {args.device}", rows if judged else _unjudged(rows))
    if args.device == "cuda" and not args.skip_tests:
        ok &= report("CUDA test variants", cuda_tests())
    return 0 if ok else 1


def _unjudged(rows: list[Row]) -> list[Row]:
    """Rows printed for reference (a CPU or quick run: the targets are for a GPU)."""
    return [(name, ratio, None) for name, ratio, _ in rows]


if __name__ == "__main__":
    sys.exit(main())
