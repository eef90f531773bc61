"""The embedded toy domain: renderer, captions and the attribute oracle (docs/toy-domain.md)."""

from models.toy.captions import all_phrasings, attribute_prompt, caption, edit_prompt
from models.toy.catalog import read_catalog, render_catalog
from models.toy.domain import (
    ATTRIBUTES,
    NAMES,
    Attributes,
    render,
    render_batch,
    sample_attributes,
    to_tensor,
)

__all__ = [
    "ATTRIBUTES",
    "NAMES",
    "Attributes",
    "all_phrasings",
    "attribute_prompt",
    "caption",
    "edit_prompt",
    "read_catalog",
    "render",
    "render_batch",
    "render_catalog",
    "sample_attributes",
    "to_tensor",
]
