"""Train the toy CLIP: a small open_clip model, contrastive on (render, caption) pairs.

Same code path as a real CLIP: an open_clip architecture given as data (``TOY_CLIP_CONFIG``), open_clip's
``ClipLoss`` (symmetric InfoNCE, Radford et al. 2021, Fig. 3), and ``ClipEncoder`` for preprocessing and
saving, so the pipeline loads it like any other checkpoint. The default tokenizer keeps its full
49408-token vocabulary; text width 48 keeps the token table (the bulk of the file) near 9.5 MB.

Text for each image, per step: usually ``caption()`` (a random subset of its attributes in varied
phrasings); with probability ``p_prompt`` the ``attribute_prompt`` of one attribute ("a red shape"),
the exact text the edits use; and with probability ``p_template`` wrapped in one of the 79 ImageNet
templates, so ``encode_prompt``'s template average lands in the same space. Optionally some batches
hold one shape colour only (``p_same_color``, ``training_batch``). Status: both the default (568 steps)
and a run with p_same_color 0.5, batch 96, lr 3e-3, p_prompt 0.3 (1000 steps) learnt colour and
background (≥ 0.94) but shape, size and position stayed at chance: more steps or a different
vision tower are needed. Images get the oracle's
blur/noise augmentations so generator outputs embed like renders.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import open_clip
import torch

from models.clip import ClipEncoder
from models.clip_templates import IMAGENET_TEMPLATES
from models.toy.captions import attribute_prompt, caption
from models.toy.domain import ATTRIBUTES, NAMES, Attributes, render_batch, render_random, to_tensor
from models.toy.train_oracle import augment

_STREAM = 0xC11F           # numpy stream tag of the CLIP's training renders
ZERO_SHOT_SEED = 7_700_201  # render_batch seed of the held-out zero-shot check

TOY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 3},
}
MODEL_NAME = "toy-clip-vit-p8"


@dataclass(frozen=True)
class ToyClipTraining:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    p_prompt: float = 0.15          # text = attribute_prompt of one attribute instead of a caption
    p_template: float = 0.3         # text wrapped in a random ImageNet template
    p_same_color: float = 0.0       # batch of one shape colour: colour alone cannot pair image and text


def build_clip() -> ClipEncoder:
    return ClipEncoder.load(MODEL_NAME, model_config=TOY_CLIP_CONFIG, preprocess="clip")


def training_text(attrs: Attributes, rng: np.random.Generator, cfg: ToyClipTraining) -> str:
    if rng.random() < cfg.p_prompt:
        name = NAMES[int(rng.integers(len(NAMES)))]
        text = attribute_prompt(name, getattr(attrs, name))
    else:
        text = caption(attrs, rng)
    if rng.random() < cfg.p_template:
        text = IMAGENET_TEMPLATES[int(rng.integers(len(IMAGENET_TEMPLATES)))].format(text)
    return text


def training_batch(rng: np.random.Generator, cfg: ToyClipTraining) -> tuple[np.ndarray, np.ndarray]:
    """Fresh renders (B, 64, 64, 3) and labels (B, 5); with p_same_color all of one shape colour.

    Colour is the easiest attribute to see; in mixed batches it pairs most captions on its own and the
    model stalls before it learns shape, size and position. One-colour batches take that shortcut away.
    """
    if rng.random() >= cfg.p_same_color:
        return render_random(rng, cfg.batch_size)
    images, idx = render_random(rng, 8 * cfg.batch_size)
    keep = np.flatnonzero(idx[:, 1] == idx[0, 1])[:cfg.batch_size]
    return images[keep], idx[keep]


def train_clip(cfg: ToyClipTraining = ToyClipTraining(), seed: int = 0, seconds_budget: float | None = None,
               log_every: int = 100) -> tuple[ClipEncoder, dict[str, Any]]:
    """Train from scratch; returns the encoder (eval mode) and its lineage."""
    torch.manual_seed(seed)
    enc = build_clip()
    model = enc.model.train()
    rng, gen = np.random.default_rng([seed, _STREAM]), torch.Generator().manual_seed(seed)
    loss_fn = open_clip.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    start, step, running = time.perf_counter(), 0, None
    for step in range(cfg.steps):
        frac = min(1.0, (time.perf_counter() - start) / seconds_budget) if seconds_budget else 0.0
        progress = max(step / cfg.steps, frac)
        if progress >= 1.0:
            break
        warm = min(1.0, (step + 1) / cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
        images, idx = training_batch(rng, cfg)
        texts = [training_text(Attributes.from_indices(row), rng, cfg) for row in idx]
        x = enc.preprocess(augment(to_tensor(images), gen))                     # (B, 3, 64, 64)
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(enc.tokenizer(texts), normalize=True)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(f"[clip] step {step + 1} loss {running:.4f} {time.perf_counter() - start:.0f}s", flush=True)
    model.eval()
    lineage = {"seed": seed, "steps": step + 1 if cfg.steps else 0, "training": asdict(cfg),
               "seconds": round(time.perf_counter() - start, 1), "final_loss": round(running or 0.0, 4)}
    return enc, lineage


@torch.no_grad()
def zero_shot_accuracy(enc: ClipEncoder, images: torch.Tensor, truth: list[Attributes],
                       templates: bool = False) -> dict[str, float]:
    """Per attribute: argmax over that attribute's values of cos(image, text of ``attribute_prompt``).

    templates=True embeds each prompt with ``encode_prompt`` (79-template average) instead of the bare text.
    """
    feats = enc.encode_images(images)                                          # (N, D)
    target = torch.tensor([a.indices() for a in truth])
    acc = {}
    for k, (name, values) in enumerate(ATTRIBUTES.items()):
        prompts = [attribute_prompt(name, v) for v in values]
        text = torch.stack([enc.encode_prompt(p) for p in prompts]) if templates else enc.encode_text(prompts)
        pred = (feats @ text.T).argmax(1)
        acc[name] = round(float((pred == target[:, k]).float().mean()), 4)
    return acc


def evaluate_clip(enc: ClipEncoder, n: int = 500, seed: int = ZERO_SHOT_SEED) -> dict[str, Any]:
    images, truth = render_batch(n, seed)
    x = to_tensor(images)
    return {"zero_shot": zero_shot_accuracy(enc, x, truth),
            "zero_shot_templates": zero_shot_accuracy(enc, x, truth, templates=True),
            "n": n, "seed": seed}
