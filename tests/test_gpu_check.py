"""bench/gpu_check.py: its CPU smoke run, in a fresh interpreter where ray and prefect cannot be
imported (the GPU machines it is for have neither)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_imports_neither_ray_nor_prefect():
    code = (
        "import sys; sys.path.insert(0, 'bench'); import gpu_check; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'prefect'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_gpu_check_smoke_run_on_cpu():
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for row in (
        "stage vs bare forward on decoded tensors",
        "stage vs naive one-image-at-a-time loop",
        "bulk-edit processor vs bare G + CLIP + mapper",
    ):
        assert row in done.stdout
