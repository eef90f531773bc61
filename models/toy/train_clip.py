"""Train the toy CLIP: a small open_clip model, contrastive on (render, caption) pairs.

Same code path as a real CLIP: an open_clip architecture given as data (``TOY_CLIP_CONFIG``: a
ModifiedResNet vision tower, width 16, and a 3-layer text transformer, width 40), open_clip's ``ClipLoss``
(symmetric InfoNCE, Radford et al. 2021, Fig. 3), and ``ClipEncoder`` for preprocessing and saving, so the
pipeline loads it like any other checkpoint. The default tokenizer keeps its full 49408-token vocabulary;
text width 40 keeps the token table (the bulk of the file) near 7.9 MB.

Loss per step, on fresh renders (oracle-style blur/noise, so generator outputs embed like renders):

    ClipLoss(image, text)                                   text: usually ``caption()``; with p_prompt an
                                                            ``attribute_prompt``; with p_template templated
  + λ_prompt · prompt_loss                                  per attribute, cross-entropy of the image among
                                                            that attribute's prompts ("a circle" / "a square"
                                                            / …): text hard negatives that differ in that
                                                            attribute only, so colour cannot decide them
  + λ_aux · Σ CE(linear head(image embedding), label)/5    training aid, discarded: makes the embedding
                                                            carry every attribute early

Why: with ClipLoss alone (and with one-colour batches) colour and background were learnt and shape, size
and position stayed at chance; with prompt_loss alone the prompts of one attribute collapse onto one
point before the image side separates them (a saddle: then neither side gets a gradient). The heads break
it: position rises after ~200 steps, size ~300, shape ~700 (``probe_every`` prints the curve).
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

_STREAM = 0xC11F  # numpy stream tag of the CLIP's training renders
ZERO_SHOT_SEED = 7_700_201  # render_batch seed of the held-out zero-shot check

TOY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    # open_clip's ModifiedResNet (layers given as a tuple): convolutions see shape and size far sooner than
    # the earlier ViT (patch 8, width 128, 3 layers), which stayed at chance on shape/size/position.
    "vision_cfg": {"image_size": 64, "layers": (1, 1, 1, 1), "width": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 40, "heads": 4, "layers": 3},
}
MODEL_NAME = "toy-clip-rn16"


@dataclass(frozen=True)
class ToyClipTraining:
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 50
    p_prompt: float = 0.15  # text = attribute_prompt of one attribute instead of a caption
    p_template: float = 0.3  # text wrapped in a random ImageNet template
    p_same_color: float = 0.0  # batch of one shape colour: colour alone cannot pair image and text
    lambda_prompt: float = 1.0  # weight of the prompt-classification loss (text hard negatives)
    lambda_aux: float = 1.0  # weight of linear attribute heads on the image embedding (not saved)


def build_clip(model_config: dict[str, Any] | None = None) -> ClipEncoder:
    return ClipEncoder.load(
        MODEL_NAME, model_config=model_config or TOY_CLIP_CONFIG, preprocess="clip"
    )


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
    keep = np.flatnonzero(idx[:, 1] == idx[0, 1])[: cfg.batch_size]
    return images[keep], idx[keep]


def prompt_loss(
    model: torch.nn.Module,
    enc: ClipEncoder,
    img: torch.Tensor,
    idx: np.ndarray,
    rng: np.random.Generator,
    cfg: ToyClipTraining,
) -> torch.Tensor:
    """Mean over attributes of the cross-entropy of classifying each image among that attribute's prompts.

    The prompts of one attribute differ in that attribute's word only ("a circle" / "a square" / …), so
    each is a hard negative for the others: colour cannot separate them, only the named attribute can.
    With probability ``p_template`` all prompts of the step are wrapped in one random ImageNet template.
    """
    texts = [attribute_prompt(n, v) for n in NAMES for v in ATTRIBUTES[n]]
    if rng.random() < cfg.p_template:
        template = IMAGENET_TEMPLATES[int(rng.integers(len(IMAGENET_TEMPLATES)))]
        texts = [template.format(t) for t in texts]
    txt = model.encode_text(enc.tokenizer(texts), normalize=True)  # (22, D)
    logits = model.logit_scale.exp() * img @ txt.T  # (B, 22)
    target = torch.from_numpy(idx)
    losses, k = [], 0
    for a, name in enumerate(NAMES):
        n = len(ATTRIBUTES[name])
        losses.append(torch.nn.functional.cross_entropy(logits[:, k : k + n], target[:, a]))
        k += n
    return torch.stack(losses).mean()


def train_clip(
    cfg: ToyClipTraining = ToyClipTraining(),
    seed: int = 0,
    seconds_budget: float | None = None,
    log_every: int = 100,
    probe_every: int = 0,
    model_config: dict[str, Any] | None = None,
) -> tuple[ClipEncoder, dict[str, Any]]:
    """Train from scratch; returns the encoder (eval mode) and its lineage.

    probe_every: every so many steps print zero-shot accuracy on 300 held-out renders (learning curve).
    """
    torch.manual_seed(seed)
    enc = build_clip(model_config)
    model = enc.model.train()
    rng, gen = np.random.default_rng([seed, _STREAM]), torch.Generator().manual_seed(seed)
    loss_fn = open_clip.ClipLoss()
    # Training aid, discarded afterwards: one linear head per attribute on the unit image embedding. It
    # makes the embedding carry every attribute from the start, so prompt texts get a signal to align to.
    heads = torch.nn.ModuleList([torch.nn.Linear(enc.embed_dim, len(ATTRIBUTES[n])) for n in NAMES])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    rest += list(heads.parameters()) if cfg.lambda_aux else []
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    start, step, running, probe = time.perf_counter(), 0, None, None
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
        x = enc.preprocess(augment(to_tensor(images), gen))  # (B, 3, 64, 64)
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(enc.tokenizer(texts), normalize=True)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        if cfg.lambda_prompt:
            loss = loss + cfg.lambda_prompt * prompt_loss(model, enc, img, idx, rng, cfg)
        if cfg.lambda_aux:
            target = torch.from_numpy(idx)
            aux = sum(
                torch.nn.functional.cross_entropy(h(8 * img), target[:, a])
                for a, h in enumerate(heads)
            )
            loss = loss + cfg.lambda_aux * aux / len(NAMES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(
                f"[clip] step {step + 1} loss {running:.4f} {time.perf_counter() - start:.0f}s",
                flush=True,
            )
        if probe_every and (step + 1) % probe_every == 0:
            if probe is None:
                images, truth = render_batch(300, ZERO_SHOT_SEED)
                probe = (to_tensor(images), truth)
            model.eval()
            print(f"[clip] step {step + 1} zero-shot {zero_shot_accuracy(enc, *probe)}", flush=True)
            model.train()
    model.eval()
    lineage = {
        "seed": seed,
        "steps": step + 1 if cfg.steps else 0,
        "training": asdict(cfg),
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": round(running or 0.0, 4),
    }
    return enc, lineage


@torch.no_grad()
def zero_shot_accuracy(
    enc: ClipEncoder, images: torch.Tensor, truth: list[Attributes], templates: bool = False
) -> dict[str, float]:
    """Per attribute: argmax over that attribute's values of cos(image, text of ``attribute_prompt``).

    templates=True embeds each prompt with ``encode_prompt`` (79-template average) instead of the bare text.
    """
    feats = enc.encode_images(images)  # (N, D)
    target = torch.tensor([a.indices() for a in truth])
    acc = {}
    for k, (name, values) in enumerate(ATTRIBUTES.items()):
        prompts = [attribute_prompt(name, v) for v in values]
        text = (
            torch.stack([enc.encode_prompt(p) for p in prompts])
            if templates
            else enc.encode_text(prompts)
        )
        pred = (feats @ text.T).argmax(1)
        acc[name] = round(float((pred == target[:, k]).float().mean()), 4)
    return acc


def evaluate_clip(enc: ClipEncoder, n: int = 500, seed: int = ZERO_SHOT_SEED) -> dict[str, Any]:
    images, truth = render_batch(n, seed)
    x = to_tensor(images)
    return {
        "zero_shot": zero_shot_accuracy(enc, x, truth),
        "zero_shot_templates": zero_shot_accuracy(enc, x, truth, templates=True),
        "n": n,
        "seed": seed,
    }
