"""Is an edit lost in the mapper, or in the direction it is given? (``deltaedit analyze edits``, part 3)

The Delta Mapper is trained on image-pair directions Δi and at edit time given the run's condition:
Δt itself (``bulk_edit.condition: text``, the paper) or a retrieved image-pair direction
(``retrieved``). For generator samples s and, per single-attribute prompt, the counterfactual s' that
differs from s only in the prompt's attribute (the domain's ``CounterfactualProvider``), this compares,
with the mask off (τ = 0) and on the same samples:

- ``image_direction``: the mapper given the counterfactual's own Δi = i(s') − i(s) — what the mapper
  can do with a direction of the kind it was trained on;
- ``condition``: the mapper given the run's condition for the prompt;
- ``cos_dt_di``: the mean cosine between Δt and those Δi.

A high ``image_direction`` with a low ``condition`` says the direction is lost between text and image
(docs/text-condition.md); both low, the mapper's. Images are decoded and embedded as the stages do
(8-bit pixels, the run's CLIP); accuracy and preservation as the evaluate stage scores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from models import edit_directions as ed
from models import metrics as M
from tasks.analysis import edits as EA
from tasks.edit.processor import EditProcessor
from tasks.prompts import EditVariant


def condition_rows(
    processor: EditProcessor,
    classifier: EA.Classifier,
    provider: EA.CounterfactualProvider,
    variants: Sequence[EditVariant],
    expected_of: EA.Expected,
) -> list[dict[str, Any]]:
    """Per single-attribute variant (one expected value, no ω): the three measures above."""
    out = []
    for v in variants:
        expected = {} if v.omega is not None else expected_of(v.source_text, v.target_text)
        if len(expected) != 1 or next(iter(expected)) not in provider.attributes():
            continue
        ((attribute, value),) = expected.items()
        base, cf = provider(attribute, value)
        try:
            out.append(
                {
                    "variant": "__".join(p for p in (v.prompt_id, v.suffix) if p),
                    "expected": expected,
                    **_compare(processor, classifier, v, base, cf, expected),
                }
            )
        except ed.PromptError:
            continue  # the prompts table reports the error
    return out


@torch.no_grad()
def _compare(
    processor: EditProcessor,
    classifier: EA.Classifier,
    variant: EditVariant,
    base: Any,
    cf: Any,
    expected: dict[str, int],
) -> dict[str, float]:
    models, batch = processor.models, processor.cfg.batch_size
    s, rgb = base.conv, base.rgb
    i1, i2 = (_embed(processor, code.conv, code.rgb) for code in (base, cf))
    dt, t_target = processor._text(variant)
    before = EA.read(models.render, classifier, s, rgb, batch)
    delta = ed.mapper_delta(models.mappers["deltaedit"], "deltaedit", s, i1, i2 - i1, t_target)
    by_image = M.oracle_scores(
        before,
        EA.read(models.render, classifier, s + variant.strength * delta, rgb, batch),
        expected,
    )
    conv, _ = processor._edit("deltaedit", replace(variant, tau=0.0), list(zip(s, rgb, i1)))
    by_condition = M.oracle_scores(
        before, EA.read(models.render, classifier, conv, rgb, batch), expected
    )
    cos = F.cosine_similarity(i2 - i1, dt.to(i1.device)[None], dim=1)
    return {
        "cos_dt_di": float(cos.mean()),
        "image_direction": EA.nan_mean(by_image["edit_accuracy"]),
        "image_direction_pres": EA.nan_mean(by_image["preservation"]),
        "condition": EA.nan_mean(by_condition["edit_accuracy"]),
        "condition_pres": EA.nan_mean(by_condition["preservation"]),
    }


def _embed(processor: EditProcessor, conv: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings of G(conv, rgb) as stored (8-bit), in bulk-edit batches."""
    size = processor.cfg.batch_size
    images = torch.cat(
        [
            EA.as_stored(processor.models.render(conv[k : k + size], rgb[k : k + size]))
            for k in range(0, len(conv), size)
        ]
    )
    return processor.models.clip.encode_images(images).to(conv.device)
