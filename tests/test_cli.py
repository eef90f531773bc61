"""The `deltaedit` command: every subcommand explains itself; errors are clear and exit non-zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

CLI = str(Path(sys.executable).with_name("deltaedit"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize(
    "sub", [[], ["run"], ["flows"], ["config"], ["store"], ["zoo"], ["toy"], ["demo"]]
)
def test_help_explains(sub):
    out = _run(*sub, "--help")
    assert out.returncode == 0 and "usage: deltaedit" in out.stdout and len(out.stdout) > 80


def test_bad_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray: {actors: -1}\n")
    out = _run("run", "ingest", "--config", str(bad))
    assert out.returncode == 2
    assert (
        str(bad) in out.stderr
        and "'ray.actors'" in out.stderr
        and "greater than or equal to 1" in out.stderr
    )


def test_unknown_flow_lists_known_ones():
    out = _run("run", "nope")
    assert out.returncode == 2 and "unknown flow 'nope'" in out.stderr and "ingest" in out.stderr


def test_config_show_applies_overrides():
    out = _run("config", "show", "configs/toy.yaml", "ray.actors=5")
    assert out.returncode == 0 and "actors: 5" in out.stdout


def test_overrides_may_follow_options(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("name: x\n")
    out = _run("run", "ingest", "--config", str(bad), "ray.actors=0")
    assert out.returncode == 2 and "'ray.actors'" in out.stderr  # the override was applied
    out = _run("flows", "bogus")
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr


def test_toy_render_writes_a_catalog(tmp_path):
    out = _run("toy", "render", "5", "--out", str(tmp_path / "cat"))
    assert out.returncode == 0, out.stderr
    assert (
        len(list((tmp_path / "cat").glob("*.png"))) == 5
        and (tmp_path / "cat" / "attributes.jsonl").exists()
    )


def test_zoo_list_names_the_models():
    out = _run("zoo", "list")
    assert out.returncode == 0 and "stylegan2" in out.stdout and "delta_mapper" in out.stdout


def test_store_ls_counts_stages_and_names_other_folders(tmp_path, capsys):
    from app.cli import main
    from infra.storage.fsio import Location
    from infra.storage.store import StageStore

    writer = StageStore(Location(str(tmp_path)), "codes").writer("00000")
    writer.add("a", "a.png")
    writer.add_failure("b", "b.png", "corrupt")
    writer.commit(input_fingerprint="x", code_fingerprint="y")
    (tmp_path / "mapper").mkdir()
    assert main(["store", "ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["codes", "1"] and "'seen': 2, 'ok': 1, 'failed': 1" in out[0]
    assert out[1] == "other folders: mapper"


def test_demo_overwrite_starts_the_pipeline_over(monkeypatch):
    """`deltaedit demo --overwrite` hands ``overwrite`` to the pipeline flow (for a demo run whose models
    hold other settings after an update); plain `deltaedit demo` resumes."""
    import app.demo as demo
    from app.cli import main

    calls: list[dict] = []

    def pipeline(*args, **kwargs):
        calls.append(kwargs)
        return {"steps": {}, "skipped": [], "manifest": "m", "report": "r"}

    monkeypatch.setattr(demo, "pipeline_flow", pipeline)
    monkeypatch.setattr(demo, "ensure_prefect_api", lambda: None)
    monkeypatch.setattr(demo, "render_catalog", lambda *args, **kwargs: None)
    assert main(["demo", "--overwrite"]) == 0 and main(["demo"]) == 0
    assert [c["overwrite"] for c in calls] == [True, False]
