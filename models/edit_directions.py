"""Edit directions in style space S from text: DeltaEdit, the straightforward baseline, StyleCLIP-GD.

All three start from the prompt's text direction Δt = Σ wₖ·(t(targetₖ) − t(sourceₖ)), each t the
unit-norm mean over prompt templates (docs/paper-setting.md, "Text prompts"):

- **DeltaEdit**: Δŝ = mapper(s, i, Δt) (the mapper normalises i and Δt), then channels whose relevance
  |Rₛ·Δt| < τ are zeroed (Δt unnormalised, as the paper's threshold τ = 0.03 assumes); ŝ = s + strength·Δŝ.
  With ``bulk_edit.condition: retrieved`` the mapper's condition is not Δt itself but the mean of the k
  image-pair directions (i₂ − i)/‖i₂ − i‖ from a memory of image embeddings that Δt points along best
  (``retrieved_direction``; docs/text-condition.md): a direction of the kind the mapper was trained on.
  With ``bulk_edit.mask: text+image`` each image also keeps the channels its retrieved direction needs
  within the prompt's image subspace (``image_mask``; docs/relevance.md).
- **straightforward**: the paper's naïve baseline, mapper(s, i, t_target) with the *target text* embedding
  where training used the second image's; the same relevance threshold, so only the mapper differs.
- **StyleCLIP global direction**: r = Rₛ·Δt/‖Δt‖, zero |r| < β, divide by max|r|, scale by each channel's
  σ; ŝ = s + α·strength·r. No mapper, the same direction for every image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.clip_templates import IMAGENET_TEMPLATES

Term = tuple[str, str, float]  # (source text, target text, weight of its Δt)
Method = Literal["deltaedit", "straightforward", "styleclip_gd"]
METHODS: tuple[Method, ...] = ("deltaedit", "straightforward", "styleclip_gd")
TEMPLATES: dict[str, tuple[str, ...]] = {"imagenet": tuple(IMAGENET_TEMPLATES), "none": ("{}",)}


class PromptError(ValueError):
    """A prompt's text cannot be encoded (empty, or longer than the text encoder's context)."""


def check_terms(
    clip: Any, terms: Sequence[Term], templates: Sequence[str], allow_truncation: bool
) -> None:
    """Raise PromptError for an empty prompt, or one that the longest template makes exceed the context."""
    longest = max(templates, key=len)
    for source, target, _ in terms:
        for text in (source, target):
            if not text.strip():
                raise PromptError(f"empty prompt (source {source!r}, target {target!r})")
            check = clip.check_prompt(longest.format(text))
            if check.truncated and not allow_truncation:
                raise PromptError(
                    f"prompt {text[:60]!r}{'…' if len(text) > 60 else ''} is {check.n_tokens} tokens with "
                    f"the template {longest!r}; the text encoder's context is {check.context_length} "
                    "(shorten it, or set bulk_edit.long_prompts=truncate to let the tokenizer cut it)"
                )


@torch.no_grad()
def text_direction(
    clip: Any, terms: Sequence[Term], templates: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """(Δt unnormalised (D,), unit-norm target embedding (D,)) of a prompt's weighted terms."""
    dt, target = 0, 0
    for source, text, weight in terms:
        t_target = clip.encode_prompt(text, templates)
        dt = dt + weight * (t_target - clip.encode_prompt(source, templates))
        target = target + weight * t_target
    return torch.as_tensor(dt).float(), F.normalize(torch.as_tensor(target).float(), dim=-1)


Threshold = Literal["absolute", "normalized", "relative"]


def relevance_mask(
    relevance: Tensor, dt: Tensor, tau: float, rule: Threshold = "absolute"
) -> Tensor:
    """(C,) bool: the channels DeltaEdit keeps, r = |Rₛ·Δt| ≥ τ under ``rule`` (all of them when τ = 0).

    - ``absolute``: r ≥ τ, the paper's rule; its τ = 0.03 is tied to ViT-B/32's typical ‖Δt‖.
    - ``normalized``: r/‖Δt‖ ≥ τ, the cosine between Δt and each channel's direction (Rₛ rows are unit
      vectors): scale-free, for a CLIP whose ‖Δt‖ differs (the toy one: 0.01 for shape words to 1.0 for
      colours).
    - ``relative``: r ≥ τ·max r, each prompt keeps the channels within a factor τ of its most relevant one:
      scale-free too, and an attribute spread thinly over many channels (each with a small cosine) keeps
      them, where one fixed cosine drops them all.
    """
    r = (relevance @ dt).abs()
    if rule == "normalized":
        r = r / dt.norm().clamp_min(1e-12)
    elif rule == "relative":
        r = r / r.max().clamp_min(1e-12)
    elif rule != "absolute":
        raise ValueError(f"threshold rule must be absolute, normalized or relative, got {rule!r}")
    return r >= tau


@torch.no_grad()
def mapper_delta(
    mapper: torch.nn.Module, method: Method, s: Tensor, i: Tensor, dt: Tensor, t_target: Tensor
) -> Tensor:
    """Δŝ (B, C) of DeltaEdit (condition Δt) or of the straightforward baseline (condition t_target)."""
    cond = dt if method == "deltaedit" else t_target
    return mapper(s, i, cond.expand(s.shape[0], -1))


@torch.no_grad()
def retrieved_direction(memory: Tensor, i: Tensor, dt: Tensor, k: int) -> Tensor:
    """(B, D): per image, the mean unit direction (m − î) of the k memory rows m whose step from the
    image î = i/‖i‖ points most along Δt, i.e. the largest cos(m − î, Δt).

    The mapper was trained on image-pair directions Δi and sees Δt only at edit time; a Δt that differs
    from every Δi it saw (text and image embeddings do not share one geometry: the toy CLIP's "a red
    shape" − "a shape" also points away from yellow) is answered off its training distribution. The
    retrieved mean is an image-pair direction that goes where Δt says from where this image is. memory:
    (P, D) unit rows; i: (B, D); dt: (D,). Memory and cost: two (B, P) matmuls, no (B, P, D) tensor.
    Rows within 1e-4 of the image itself (its own embedding in the memory) are never picked."""
    if not 0 < k <= len(memory):
        raise ValueError(f"retrieve_k must be in 1..{len(memory)} (the memory's rows), got {k}")
    img = F.normalize(i.float(), dim=-1)
    direction = F.normalize(dt.float(), dim=-1)
    along = memory @ direction - (img @ direction)[:, None]  # (B, P): (m − î)·Δt̂
    dist = (2 - 2 * img @ memory.T).clamp_min(0).sqrt()  # (B, P): ‖m − î‖ (unit rows)
    score = torch.where(dist > 1e-4, along / dist.clamp_min(1e-4), torch.full_like(along, -2.0))
    top = score.topk(k, dim=1).indices  # (B, k)
    steps = memory[top] - img[:, None]  # (B, k, D)
    return F.normalize(steps, dim=-1).mean(dim=1)


SUBSPACE_PROBES = 1024  # memory rows whose retrieved directions span a prompt's image subspace


@torch.no_grad()
def prompt_subspace(memory: Tensor, dt: Tensor, k: int, rank: int) -> Tensor:
    """(rank, D) orthonormal rows: the main directions in which images move for this prompt.

    The retrieved directions (``retrieved_direction``) of up to ``SUBSPACE_PROBES`` evenly spaced memory
    rows, one per probe image, go to the prompt's value from wherever each image is: "a medium shape" moves
    small images up and large ones down the size axis. Their leading right singular vectors span that
    movement; what else a retrieved pair changes (other attributes, differing from pair to pair) spreads
    over many weaker directions and is left out."""
    probes = memory[:: max(1, len(memory) // SUBSPACE_PROBES)][:SUBSPACE_PROBES]
    directions = retrieved_direction(memory, probes, dt, min(k, len(memory) - 1))
    return torch.linalg.svd(directions, full_matrices=False).Vh[:rank]


def image_mask(relevance: Tensor, directions: Tensor, subspace: Tensor, tau: float) -> Tensor:
    """(B, C) bool: per image, the channels whose unit Rₛ direction has |dot| ≥ τ with the image's unit
    direction (B, D) projected onto the prompt's subspace (R, D): the cosine, scaled by how much of the
    direction lies in the subspace.

    The Δt mask (``relevance_mask``) is one set of channels for every image: those Δt points along. An edit
    to a value between others, or a Δt that mostly says "not X", needs channels Δt is nearly orthogonal to
    (growing a small shape to medium moves the small ↔ large axis); this mask adds them image by image."""
    projected = (
        F.normalize(directions.float(), dim=-1) @ subspace.T
    ) @ subspace  # not renormalised: a
    return (
        projected @ F.normalize(relevance, dim=-1).T
    ).abs() >= tau  # direction outside keeps none


def global_direction(relevance: Tensor, dt: Tensor, sigma: Tensor, beta: float) -> Tensor:
    """StyleCLIP-GD's per-channel step (C,) before α: thresholded, max-normalised, σ-scaled."""
    r = relevance @ F.normalize(dt, dim=-1)
    r = torch.where(r.abs() < beta, torch.zeros_like(r), r)
    peak = r.abs().max()
    return r / torch.where(peak > 0, peak, torch.ones_like(peak)) * sigma  # no sync with the host
