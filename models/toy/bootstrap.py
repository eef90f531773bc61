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
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from models.toy.domain import render_batch, to_tensor
from models.toy.oracle import DEFAULT_PATH as ORACLE_PATH
from models.toy.oracle import Oracle
from models.toy.train_clip import ToyClipTraining, evaluate_clip, train_clip
from models.toy.train_encoder import ToyEncoderConfig, train_encoder
from models.toy.train_generator import RECON_SEED, ToyGeneratorConfig, attribute_agreement, evaluate_prior_fit, \
    evaluate_samples, evaluate_vae, train_generator

SHARES = {"generator": 0.54, "encoder": 0.22, "clip": 0.24}  # relative training time per phase (shipped run)
EVAL_SHARE = 0.08                                              # of minutes_budget, kept for evaluation


@torch.no_grad()
def evaluate_inversion(encoder: torch.nn.Module, oracle: Oracle, n: int = 500, seed: int = RECON_SEED
                       ) -> dict[str, Any]:
    """Oracle agreement between held-out renders x and G(E(x)), per attribute and overall."""
    x = to_tensor(render_batch(n, seed)[0])
    y = encoder.generator(encoder(x)).clamp(-1, 1)
    per = attribute_agreement(oracle, x, y)
    return {"agreement": per, "mean": round(sum(per.values()) / len(per), 4), "n": n, "seed": seed}


def bootstrap(out_dir: str = "zoo/toy", seed: int = 0, minutes_budget: float | None = None, *,
              generator: ToyGeneratorConfig = ToyGeneratorConfig(), encoder: ToyEncoderConfig = ToyEncoderConfig(),
              clip: ToyClipTraining = ToyClipTraining(), oracle_path: str = ORACLE_PATH,
              threads: int = 2, parts: tuple[str, ...] = ("generator", "clip")) -> dict[str, Any]:
    """Train the toy models in sequence and write them to ``out_dir``; returns the metrics.

    parts: "generator" (generator, then its encoder) and/or "clip"; the two are independent, so they may
    also run as two processes (e.g. on a busy machine), each writing its own files.
    """
    phases = [k for k in SHARES if k in parts or (k == "encoder" and "generator" in parts)]
    total = sum(SHARES[k] for k in phases) / (1 - EVAL_SHARE)
    budget = {k: (minutes_budget * 60 * SHARES[k] / total if minutes_budget else None) for k in SHARES}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        oracle = Oracle.load(oracle_path)
        metrics: dict[str, Any] = {"seed": seed}
        if "generator" in parts:
            metrics.update(_generator_and_encoder(out, oracle, seed, budget, generator, encoder))
        if "clip" in parts:
            metrics.update(_clip(out, seed, budget, clip))
    finally:
        torch.set_num_threads(previous)
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("*.safetensors"))}
    return metrics | {"minutes": round((time.perf_counter() - start) / 60, 2), "file_bytes": sizes,
                      "total_mb": round(sum(sizes.values()) / 2 ** 20, 2)}


def _generator_and_encoder(out: Path, oracle: Oracle, seed: int, budget: dict[str, float | None],
                           generator: ToyGeneratorConfig, encoder: ToyEncoderConfig) -> dict[str, Any]:
    # 1. generator (fitted prior, or VAE decoder) and its sample statistics
    G, zenc, g_lineage = train_generator(generator, seed, budget["generator"])
    g_lineage["samples"] = evaluate_samples(G, oracle)
    if zenc is None:
        g_lineage["prior_fit"] = evaluate_prior_fit(G, oracle)
    else:
        g_lineage["vae_reconstruction"] = evaluate_vae(G, zenc, oracle)
    G.save(str(out / "generator.safetensors"), lineage=g_lineage)
    # 2. encoder with the generator inside
    E, e_lineage = train_encoder(G, zenc, encoder, seed, budget["encoder"])
    e_lineage["reconstruction"] = evaluate_inversion(E, oracle)
    E.save(str(out / "encoder.safetensors"), lineage=e_lineage)
    fit = "prior_fit" if zenc is None else "vae_reconstruction"
    return {"generator": {k: g_lineage[k] for k in ("steps", "seconds", "samples", fit)},
            "encoder": {k: e_lineage[k] for k in ("steps", "seconds", "reconstruction")}}


def _clip(out: Path, seed: int, budget: dict[str, float | None], clip: ToyClipTraining) -> dict[str, Any]:
    # 3. CLIP
    C, c_lineage = train_clip(clip, seed, budget["clip"])
    c_lineage.update(evaluate_clip(C))   # evaluate_clip's "seed" is the held-out render seed: keep both
    c_lineage["eval_seed"], c_lineage["seed"] = c_lineage["seed"], seed
    C.save(str(out / "clip.safetensors"), lineage=c_lineage)
    return {"clip": {k: c_lineage[k] for k in ("steps", "seconds", "final_loss", "zero_shot",
                                               "zero_shot_templates")}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="zoo/toy", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget; phases stop early when their share is spent")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a busy machine)")
    parser.add_argument("--parts", default="generator,clip", help="generator (+ encoder) and/or clip")
    args = parser.parse_args(argv)
    metrics = bootstrap(args.out, args.seed, args.minutes, threads=args.threads, parts=tuple(args.parts.split(",")))
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
