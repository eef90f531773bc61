"""Help text shared by the CLI's modules."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

TOY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")  # a key.path=value config override


def fill(*paragraphs: str) -> str:
    """Paragraphs wrapped for a RawDescriptionHelpFormatter (it keeps the blank lines between)."""
    return "\n\n".join(textwrap.fill(p, 100) for p in paragraphs)
