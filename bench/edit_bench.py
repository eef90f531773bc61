"""Edit stage speed (issue 7): edits/s of the bulk-edit flow vs a one-image-at-a-time loop like the official
DeltaEdit inference script, same models, measured in one process                               → ≥ 5

BASELINE, the official ``scripts/inference.py`` loop: batch size 1, the image's stored code and stored CLIP
feature (as that script reads them from .npy files), and per image: the Delta Mapper once per prompt
(batch 1) with the relevance selection |Rₛ·Δt| < τ zeroed, then G decodes the original code and every
edited code (batch 1), and the images are written out (here one PNG per decode, so the pixels can be
compared, with our encoder at ``bulk_edit.png_level`` as the stage writes them; the script writes one JPEG
per image). Δt of each prompt is computed once, as the script does.

OURS, the same work: the edit stage (``EditProcessor`` via ``execute_shard``: the codes and clip_images
stores in, the edits store out as WebDataset tar + Parquet) with ``reconstruction: true`` (G(s) of every
image, the script's "original" column), in batches of ``batch_size``:
  1. one torch thread on each side: our stage eager, and with ``bulk_edit.compile`` (torch.compile);
  2. the whole machine (``--actors``, default: one per core): the flow's own orchestration
     (``infra.runtime.orchestrate.run_stage``: a Prefect task per shard on a Ray actor pool, one CPU per actor,
     with ``bulk_edit.compile`` on, and for information off) vs the loop with torch's intra-op threads
     over every core, as the script runs by default, or with one thread if that is faster (at batch 1 it
     often is). The pool's models are loaded (and compiled) in a warm-up run; the timed runs overwrite
     the store.
The target row is (2), compiled: the flow set up for a big bulk edit against the script as users run it,
on the same cores.
The flow edits ``--images`` (1024) images, so its per-run costs (a flow run, Prefect's result storage)
weigh as little as in a real bulk edit; the loops and the in-process stage run on the first
``--loop-images`` (256) of them — a one-image-at-a-time loop costs the same per edit at any size.

Models: the toy generator and CLIP (zoo/toy, 64 px), a Delta Mapper with random weights for that
generator, a relevance matrix of random unit rows. Codes: G.style_space(G.mapping(z)); their CLIP
embeddings from G(s). Best of --repeat runs. The same edits must give the same pixels on both sides
(batched and batch-1 convolutions, and compiled kernels, round differently: ≤ 2/255 allowed).

Run: .venv/bin/python bench/edit_bench.py [--quick] [--images N] [--loop-images M] [--prompts P] [--repeat R]
     [--actors A]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of_each, report  # noqa: E402

from infra.config import BulkEditConfig, PrefectConfig, RayConfig, RunConfig  # noqa: E402
from infra.runtime.stage import execute_shard  # noqa: E402
from infra.storage.fsio import Location  # noqa: E402
from infra.storage.readers import decode_image, iter_image_samples  # noqa: E402
from infra.storage.store import StageStore  # noqa: E402
from models import edit_directions as ed  # noqa: E402
from models.clip import ClipEncoder  # noqa: E402
from models.delta_mapper import DeltaMapper, MapperConfig  # noqa: E402
from models.imaging import encode_image, to_uint8  # noqa: E402
from models.stylegan2 import Generator, StyleCode  # noqa: E402
from models.zoo import ModelSpec  # noqa: E402
from tasks.edit.builder import EditBuilder, compiled_synthesis  # noqa: E402
from tasks.edit.processor import EditModels, EditProcessor, edit_key, plan_edits, recon_key  # noqa: E402
from tasks.prompts import EditVariant  # noqa: E402

ZOO = Path(__file__).resolve().parents[1] / "zoo" / "toy"
PROMPTS = [
    ("red", "a shape", "a red shape"),
    ("big", "a shape", "a large shape"),
    ("circle", "a square", "a circle"),
    ("blue", "a shape", "a blue shape"),
    ("small", "a shape", "a small shape"),
    ("green", "a shape", "a green shape"),
    ("left", "a shape", "a shape on the left"),
    ("dark", "a light background", "a dark background"),
]
RELEVANCE, MAPPER = "relevance_exact", "mapper.safetensors"


def toy_models(seed: int = 0, device: str = "cpu") -> EditModels:
    """Toy generator and CLIP (zoo/toy), a random-weight Delta Mapper and random unit relevance rows."""
    G = Generator.from_checkpoint(str(ZOO / "generator.safetensors")).to(device).eval()
    clip = ClipEncoder.load(checkpoint=str(ZOO / "clip.safetensors"), device=device)
    return with_random_mapper(G, clip, seed)


def with_random_mapper(G: Generator, clip: ClipEncoder, seed: int = 0) -> EditModels:
    """G and CLIP with a seeded random Delta Mapper and random unit Rₛ rows, on G's device."""
    torch.manual_seed(seed)
    config = MapperConfig(layout=G.layout.to_dict(), clip_dim=clip.embed_dim)
    mapper = DeltaMapper(config).to(clip.device).eval()
    rows = torch.randn(G.layout.conv_total, clip.embed_dim)
    relevance = torch.nn.functional.normalize(rows, dim=-1).to(clip.device)
    return EditModels(G, clip, {"deltaedit": mapper}, relevance, None)


def _commit(
    root: Path, stage: str, meta: dict, rows: dict[str, dict[str, np.ndarray]]
) -> StageStore:
    store = StageStore(Location(str(root)), stage)
    writer = store.writer("00000", meta)
    for key, vectors in rows.items():
        writer.add(key, key, vectors=vectors)
    writer.commit(input_fingerprint="bench", code_fingerprint="bench")
    return store


@torch.no_grad()
def inputs(models: EditModels, n: int, root: Path) -> tuple[StageStore, StageStore]:
    """A run root with the codes and clip_images stores (one shard), Rₛ and the mapper (for the
    pool); the codes are sampled and embedded on the models' device."""
    G, clip = models.generator, models.clip
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(1)).to(models.device)
    code = G.style_space(G.mapping(z))
    emb = clip.encode_images(
        torch.from_numpy(to_uint8(G.synthesize(code))).permute(0, 3, 1, 2) / 127.5 - 1
    )
    host = (code.conv, code.rgb, emb, models.relevance)
    conv, rgb, emb, relevance = (x.cpu().numpy() for x in host)
    keys = [f"img_{i:05d}" for i in range(n)]
    codes = _commit(
        root,
        "codes",
        {"layout": G.layout.to_dict()},
        {k: {"s": conv[i], "s_rgb": rgb[i]} for i, k in enumerate(keys)},
    )
    embeddings = _commit(
        root,
        "clip_images",
        {"model": "toy"},
        {k: {"embedding": emb[i]} for i, k in enumerate(keys)},
    )
    _commit(
        root,
        RELEVANCE,
        {"n_channels": len(relevance)},
        {f"ch{c:06d}": {"direction": r} for c, r in enumerate(relevance)},
    )
    models.mappers["deltaedit"].save(str(root / MAPPER))
    return codes, embeddings


def official_loop(
    models: EditModels,
    stored: dict,
    variants: list[EditVariant],
    texts: dict,
    cfg: BulkEditConfig,
    out: Path,
) -> None:
    """scripts/inference.py: per image, batch 1: the mapper per prompt, then decode the original and each edit."""
    G, mapper, R = models.generator, models.mappers["deltaedit"], models.relevance
    selects = {pid: ed.relevance_mask(R, dt, cfg.tau) for pid, dt in texts.items()}
    out.mkdir()
    for key, (s, rgb, i) in stored.items():
        s, rgb, i = s[None], rgb[None], i[None]
        deltas = [mapper(s, i, texts[v.prompt_id][None]) * selects[v.prompt_id] for v in variants]
        images = [G.synthesize(StyleCode(s, rgb))] + [
            G.synthesize(StyleCode(s + v.strength * d, rgb)) for v, d in zip(variants, deltas)
        ]
        names = [recon_key(key)] + [edit_key(key, v, "deltaedit") for v in variants]
        for name, image in zip(names, images):
            (out / f"{name}.png").write_bytes(
                encode_image(to_uint8(image)[0], "png", cfg.png_level)
            )


@torch.no_grad()
def breakdown(
    models: EditModels,
    stored: dict,
    dt: torch.Tensor,
    cfg: BulkEditConfig,
    compiled: Callable,
    repeat: int,
) -> dict[str, tuple[float, float]]:
    """ms per edit of each step at batch 1 and at the stage's batch size (best of ``repeat``)."""
    keys = list(stored)[: cfg.batch_size]
    s, rgb, emb = (torch.stack([stored[k][n] for k in keys]) for n in range(3))
    G, mapper = models.generator, models.mappers["deltaedit"]
    pixels = to_uint8(G.synthesize(StyleCode(s, rgb)))
    steps = {
        "Delta Mapper": (
            lambda: [mapper(s[n : n + 1], emb[n : n + 1], dt[None]) for n in range(len(keys))],
            lambda: mapper(s, emb, dt.expand(len(keys), -1)),
        ),
        "G.synthesize (eager)": (
            lambda: [
                G.synthesize(StyleCode(s[n : n + 1], rgb[n : n + 1])) for n in range(len(keys))
            ],
            lambda: G.synthesize(StyleCode(s, rgb)),
        ),
        "G.synthesize (compiled)": (lambda: None, lambda: compiled(s, rgb)),
        "PNG encode": (lambda: [encode_image(p, "png", cfg.png_level) for p in pixels],) * 2,
    }
    fns = {(name, k): fn for name, pair in steps.items() for k, fn in enumerate(pair)}
    for fn in fns.values():
        fn()
    t = best_of_each(fns, repeat)
    return {
        name: (t[(name, 0)] / len(keys) * 1e3, t[(name, 1)] / len(keys) * 1e3) for name in steps
    }


def pool_flows(
    root: Path, specs: list, cfg: BulkEditConfig, actors: int
) -> dict[str, Callable[[], None]]:
    """The flow's ``run_stage`` (Prefect task per shard, Ray pool of ``actors`` × 1 CPU), eager and compiled.

    Both share one pool; each call of a flow loads its stage on the actors when the other ran last
    (so warm each up before timing it: models load, and every actor compiles).
    """
    from prefect import flow

    from infra.runtime.orchestrate import run_stage
    from infra.runtime.prefect_runtime import ensure_prefect_api
    from infra.runtime.ray_pool import ActorPool, init_ray

    ensure_prefect_api()
    ray_cfg = RayConfig(num_cpus=actors, actors=actors, cpus_per_actor=1)
    init_ray(ray_cfg)
    pool = ActorPool(str(root), {}, ray_cfg)
    assert len(specs) >= actors, "fewer shards than actors: a warm-up would not reach every actor"

    def make(compile: bool) -> Callable[[], None]:
        run_cfg = RunConfig(
            root=str(root),
            ray=ray_cfg,
            prefect=PrefectConfig(cache=False, retries=0),
            bulk_edit=cfg.model_copy(update={"compile": compile}),
        )
        builder = EditBuilder(
            ModelSpec(name="stylegan2", checkpoint=str(ZOO / "generator.safetensors")),
            ModelSpec(name="open_clip", checkpoint=str(ZOO / "clip.safetensors")),
            (("deltaedit", ModelSpec(name="delta_mapper", checkpoint=str(root / MAPPER))),),
            str(root),
            run_cfg.bulk_edit,
            RELEVANCE,
            device="cpu",
            cpus=1,
            stage="edits_pool",
        )

        @flow(name="edit-bench", log_prints=False)
        def edit_flow() -> None:
            summary = run_stage(builder, specs, run_cfg, overwrite=True, progress=False, pool=pool)
            assert summary.ok == sum(len(s.items) for s in specs) and not summary.failed_shards, (
                summary.line()
            )

        return edit_flow

    return {"eager": make(False), "compiled": make(True)}


def threads(n: int, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run with ``n`` torch intra-op threads (the rest of the benchmark keeps one)."""

    def run() -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            fn()
        finally:
            torch.set_num_threads(before)

    return run


def same_pixels(ours: StageStore, theirs: Path) -> float:
    """Largest |difference| (0..255 levels) between the loop's files and our stored PNGs of the same keys."""
    files = {f.stem: f for f in theirs.glob("*.png")}
    worst, seen = 0.0, 0
    for sample in iter_image_samples(ours):
        if sample["__key__"] in files:
            other = decode_image(files[sample["__key__"]].read_bytes())
            worst = max(worst, (decode_image(sample["png"]) - other).abs().max().item() * 127.5)
            seen += 1
    assert seen == len(files), (
        f"{len(files) - seen} of the loop's images are missing from our store"
    )
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer images, one round (a smoke run)"
    )
    parser.add_argument(
        "--images", type=int, default=1024, help="images the flow edits (whole machine)"
    )
    parser.add_argument(
        "--loop-images",
        type=int,
        default=256,
        help="the first N of them for the loops and the in-process stage (rates are per edit)",
    )
    parser.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the fastest counts")
    parser.add_argument(
        "--actors",
        type=int,
        default=os.cpu_count() or 1,
        help="actors (= cores) for the whole-machine comparison (0: skip it)",
    )
    args = parser.parse_args()
    n, n_loop, repeat = (
        (64, 32, 1)
        if args.quick
        else (args.images, min(args.loop_images, args.images), args.repeat)
    )
    cfg = BulkEditConfig(
        methods=["deltaedit"],
        reconstruction=True,
        images_per_shard=64 if not args.quick else 16,
        batch_size=32,
    )
    variants = [
        EditVariant(pid, ((src, tgt, 1.0),), cfg.tau) for pid, src, tgt in PROMPTS[: args.prompts]
    ]
    models = toy_models()
    per_image = len(variants) + 1  # every edit and the original, on both sides
    rows, worst = [], 0.0

    with tempfile.TemporaryDirectory() as tmp_dir, torch.no_grad():
        tmp = Path(tmp_dir)
        torch.set_num_threads(1)
        codes, embeddings = inputs(models, n, tmp / "run")
        eager = EditProcessor(models, codes, embeddings, cfg)
        compiled_models = EditModels(
            **{**vars(models), "synthesize": compiled_synthesis(models.generator, cfg.batch_size)}
        )
        compiled = EditProcessor(compiled_models, codes, embeddings, cfg)
        specs = plan_edits(codes, variants, cfg.methods, cfg)
        small = plan_edits(
            codes, variants, cfg.methods, cfg.model_copy(update={"max_images": n_loop})
        )
        assert sum(len(s.items) for s in specs) == n * per_image
        n_small = sum(len(s.items) for s in small)
        texts = {
            v.prompt_id: ed.text_direction(models.clip, v.terms, ed.TEMPLATES[cfg.templates])[0]
            for v in variants
        }
        images = sorted({i.meta["image"] for spec in small for i in spec.items})
        stored = {k: v for k, v in eager._inputs(specs[0]).items() if k in images}
        runs = iter(range(10_000))
        out: dict[str, object] = {}

        def stage(processor: EditProcessor, name: str) -> Callable[[], None]:
            def run() -> None:
                store = StageStore(Location(str(tmp / "run" / f"{name}-{next(runs)}")), "edits")
                for spec in small:
                    execute_shard(processor, spec, store, "bench")
                out[name] = store

            return run

        def loop(name: str) -> Callable[[], None]:
            def run() -> None:
                target = tmp / f"{name}-{next(runs)}"
                official_loop(models, stored, variants, texts, cfg, target)
                out[name] = target

            return run

        one = {
            "eager": stage(eager, "eager"),
            "compiled": stage(compiled, "compiled"),
            "loop": loop("loop"),
        }
        for fn in one.values():  # warm-up (compiles)
            fn()
        times = best_of_each(one, repeat)
        worst = max(
            same_pixels(out["eager"], out["loop"]), same_pixels(out["compiled"], out["loop"])
        )
        parts = breakdown(
            models, stored, texts[variants[0].prompt_id], cfg, compiled_models.synthesize, repeat
        )
        rate = {k: n_small / t for k, t in times.items()}
        print(
            f"\n{len(variants)} prompts + the original per image (deltaedit, toy 64 px models); best of {repeat}"
        )
        print(f"  one torch thread each, {n_loop} images = {n_small} decodes:")
        for k, label in (
            ("eager", "ours: edit stage, eager"),
            ("compiled", "ours: edit stage, compiled"),
            ("loop", "official loop (batch 1)"),
        ):
            print(
                f"    {label:44s} {rate[k]:8.1f} edits/s  ({times[k] * 1e3 / n_small:.2f} ms/edit)"
            )
        print(f"  where the time goes (ms per edit, batch 1 vs batch {cfg.batch_size}):")
        for name, (b1, many) in parts.items():
            print(
                f"    {name:28s} {b1:6.2f}  vs {many:6.2f}"
                if name != "G.synthesize (compiled)"
                else f"    {name:28s}    –    vs {many:6.2f}"
            )
        rows += [
            ("(info) one thread: ours eager vs official loop", rate["eager"] / rate["loop"], 0.0),
            (
                "(info) one thread: ours compiled vs official loop",
                rate["compiled"] / rate["loop"],
                0.0,
            ),
        ]

        if args.actors > 0:
            cores = args.actors
            t_flow = {}
            for name, flow_fn in pool_flows(tmp / "run", specs, cfg, cores).items():
                flow_fn()  # warm-up: this stage loads (and compiles)
                t_flow[name] = best_of_each({name: flow_fn}, repeat)[name]
            worst = max(
                worst,
                same_pixels(StageStore(Location(str(tmp / "run")), "edits_pool"), out["loop"]),
            )
            loop_all = threads(cores, loop("loop_all"))
            loop_all()
            t_loop = best_of_each({"loop_all": loop_all}, repeat)["loop_all"]
            r_flow = {name: n * per_image / t for name, t in t_flow.items()}
            r_loop = n_small / t_loop
            best_loop = max(r_loop, rate["loop"])  # the loop at its better thread count
            print(
                f"  the whole machine ({cores} cores), {n} images = {n * per_image} decodes in the flow:"
            )
            for name in ("compiled", "eager"):
                print(
                    f"    {'flow: run_stage, %d actors × 1 CPU, %s' % (cores, name):44s} {r_flow[name]:8.1f} edits/s"
                )
            print(
                f"    {'official loop, %d intra-op threads' % cores:44s} {r_loop:8.1f} edits/s "
                f"(1 thread: {rate['loop']:.1f})"
            )
            rows[:0] = [
                (
                    f"flow ({cores} actors, compiled) vs official loop (best of 1 and {cores} threads)",
                    r_flow["compiled"] / best_loop,
                    5.0,
                ),
                (
                    "(info) the same, flow eager (bulk_edit.compile: false, the default)",
                    r_flow["eager"] / best_loop,
                    0.0,
                ),
            ]
            shutil.rmtree(tmp / "run" / "edits_pool", ignore_errors=True)
    same = worst <= 2.0
    print(
        f"  same pixels: every image of the loops vs ours, max |diff| = {worst:.0f}/255 "
        f"({'ok' if same else 'MISMATCH'}, allowed 2/255)"
    )
    ok = report(
        f"edit: {len(variants)} prompts, images_per_shard {cfg.images_per_shard}, batch {cfg.batch_size}",
        rows,
    )
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
