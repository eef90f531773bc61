"""Zoo bootstrap for the toy domain: train generator, encoder and CLIP, write ``zoo/toy/*.safetensors``.

``python -m models.toy.bootstrap --out zoo/toy [--seed 0] [--minutes 28]`` (the ``deltaedit zoo train toy``
command). Three steps, each on fresh renders of the procedural domain, all on CPU:

1. generator — a 64 px StyleGAN2 fitted to the renderer's own draws, z → render (``train_generator``);
2. encoder  — the e4e-style image → W+ encoder for that generator (``train_encoder``), saved with G inside;
3. clip     — a small open_clip model trained contrastively on captions (``train_clip``).

Each file's lineage records seed, steps, seconds and the held-out metrics (oracle-read reconstruction,
sample coverage, zero-shot accuracy). Seeds fix every random draw; with ``minutes_budget=None`` the step
counts are fixed too and a rerun on the same machine gives the same weights. With a budget each phase
stops early when its share of the time is spent (the lineage says after how many steps).

The CLIP does not depend on the generator, so with two threads and both parts the CLIP trains in a
second process (one thread each): on two cores the bootstrap takes as long as its longer half.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from models.toy.domain import render_batch, to_tensor
from models.toy.oracle import DEFAULT_PATH as ORACLE_PATH
from models.toy.oracle import Oracle
from models.toy.train_clip import ToyClipTraining, evaluate_clip, train_clip
from models.toy.train_encoder import ToyEncoderConfig, train_encoder
from models.toy.train_generator import (
    RECON_SEED,
    ToyGeneratorConfig,
    attribute_agreement,
    evaluate_prior_fit,
    evaluate_samples,
    train_generator,
)

SHARES = {
    "generator": 0.47,
    "encoder": 0.27,
    "clip": 0.26,
}  # one-thread training time per phase (shipped run)
EVAL_SHARE = 0.08  # of minutes_budget, kept for evaluation


@torch.no_grad()
def evaluate_inversion(
    encoder: torch.nn.Module, oracle: Oracle, n: int = 500, seed: int = RECON_SEED
) -> dict[str, Any]:
    """Oracle agreement between held-out renders x and G(E(x)), per attribute and overall."""
    x = to_tensor(render_batch(n, seed)[0])
    y = encoder.generator(encoder(x)).clamp(-1, 1)
    per = attribute_agreement(oracle, x, y)
    return {"agreement": per, "mean": round(sum(per.values()) / len(per), 4), "n": n, "seed": seed}


def bootstrap(
    out_dir: str = "zoo/toy",
    seed: int = 0,
    minutes_budget: float | None = None,
    *,
    generator: ToyGeneratorConfig = ToyGeneratorConfig(),
    encoder: ToyEncoderConfig = ToyEncoderConfig(),
    clip: ToyClipTraining = ToyClipTraining(),
    oracle_path: str = ORACLE_PATH,
    threads: int = 2,
    parts: tuple[str, ...] = ("generator", "clip"),
) -> dict[str, Any]:
    """Train the toy models and write them to ``out_dir``; returns the metrics.

    parts: "generator" (generator, then its encoder) and/or "clip". The two are independent: with both and
    ``threads`` ≥ 2 the CLIP trains in a child process with one thread while this one trains the generator
    with ``threads - 1``; otherwise they run one after the other.
    """
    split = "generator" in parts and "clip" in parts and threads >= 2
    halves = (
        [["generator", "encoder"], ["clip"]]
        if split
        else [[k for k in SHARES if k in parts or (k == "encoder" and "generator" in parts)]]
    )
    budget = {}
    for phases in halves:  # with a budget, each half's phases share its wall time by SHARES
        total = sum(SHARES[k] for k in phases) / (1 - EVAL_SHARE)
        budget |= {
            k: (minutes_budget * 60 * SHARES[k] / total if minutes_budget else None) for k in phases
        }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads - 1 if split else threads)
    start = time.perf_counter()
    metrics: dict[str, Any] = {"seed": seed}
    try:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) if split else nullcontext() as pool:
            clip_half = pool.submit(_clip, out, seed, budget, clip, 1) if split else None
            if "generator" in parts:
                metrics.update(
                    _generator_and_encoder(
                        out,
                        Oracle.load(oracle_path),
                        seed,
                        budget,
                        generator,
                        encoder,
                        clip_half.exception if clip_half else lambda: None,
                        threads,
                    )
                )
            if "clip" in parts:
                metrics.update(clip_half.result() if clip_half else _clip(out, seed, budget, clip))
    finally:
        torch.set_num_threads(previous)
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("*.safetensors"))}
    return metrics | {
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "file_bytes": sizes,
        "total_mb": round(sum(sizes.values()) / 2**20, 2),
    }


def _generator_and_encoder(
    out: Path,
    oracle: Oracle,
    seed: int,
    budget: dict[str, float | None],
    generator: ToyGeneratorConfig,
    encoder: ToyEncoderConfig,
    wait_for_clip: Callable[[], object],
    threads: int,
) -> dict[str, Any]:
    # 1. generator (fitted mapping, then the synthesis) and its sample statistics
    G, g_lineage = train_generator(generator, seed, budget["generator"])
    g_lineage["samples"] = evaluate_samples(G, oracle)
    g_lineage["prior_fit"] = evaluate_prior_fit(G, oracle)
    G.save(str(out / "generator.safetensors"), lineage=g_lineage)
    # 2. encoder with the generator inside, on every thread once the CLIP's process has ended (waiting for it,
    #    so that the encoder's thread count, and with it its float rounding, is the same on every run)
    wait_for_clip()
    torch.set_num_threads(threads)
    E, e_lineage = train_encoder(G, encoder, seed, budget["encoder"])
    e_lineage["reconstruction"] = evaluate_inversion(E, oracle)
    E.save(str(out / "encoder.safetensors"), lineage=e_lineage)
    return {
        "generator": {
            k: g_lineage[k] for k in ("steps", "seconds", "mapping_fit", "samples", "prior_fit")
        },
        "encoder": {k: e_lineage[k] for k in ("steps", "seconds", "reconstruction")},
    }


def _clip(
    out: Path,
    seed: int,
    budget: dict[str, float | None],
    clip: ToyClipTraining,
    threads: int | None = None,
) -> dict[str, Any]:
    # 3. CLIP (threads: set in a child process)
    if threads:
        torch.set_num_threads(threads)
    C, c_lineage = train_clip(clip, seed, budget["clip"])
    c_lineage.update(
        evaluate_clip(C)
    )  # evaluate_clip's "seed" is the held-out render seed: keep both
    c_lineage["eval_seed"], c_lineage["seed"] = c_lineage["seed"], seed
    C.save(str(out / "clip.safetensors"), lineage=c_lineage)
    return {
        "clip": {
            k: c_lineage[k]
            for k in ("steps", "seconds", "final_loss", "zero_shot", "zero_shot_templates")
        }
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="zoo/toy", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget; phases stop early when their share is spent",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (default 2: with both parts the CLIP trains in a second process; "
        "1 on a busy machine: one part after the other)",
    )
    parser.add_argument(
        "--parts", default="generator,clip", help="generator (+ encoder) and/or clip"
    )
    args = parser.parse_args(argv)
    metrics = bootstrap(
        args.out, args.seed, args.minutes, threads=args.threads, parts=tuple(args.parts.split(","))
    )
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
