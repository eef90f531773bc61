"""prefect.yaml is accepted by `prefect deploy --all` against a real local Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port

from flows.registry import FLOWS, load_flow, prefect_yaml_mismatches

PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("prefect server did not start in 120 s")
    yield {**env, "PREFECT_API_URL": url, "DELTAEDIT_REPO": str(REPO)}
    proc.terminate()
    proc.wait(timeout=30)


def _prefect(env, *args: str) -> str:
    done = subprocess.run(
        [PREFECT, "--no-prompt", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_flow_has_a_deployment():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    entrypoints = {d["entrypoint"] for d in spec["deployments"]}
    assert {f.entrypoint for f in FLOWS.values()} == entrypoints
    assert prefect_yaml_mismatches(REPO / "prefect.yaml") == []
    nightly = [d for d in spec["deployments"] if d.get("schedules")]
    assert any(s["cron"] == "0 2 * * *" for d in nightly for s in d["schedules"])


def test_registry_names_are_the_flows_own_names():
    """`deltaedit run <name>` and the Prefect flow (its runs, its deployments) go by the same name."""
    assert {name: load_flow(name).name for name in FLOWS} == {name: name for name in FLOWS}


def test_a_deployment_of_no_registered_flow_is_reported(tmp_path):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    spec["deployments"][0]["entrypoint"] = "flows/gone.py:gone_flow"
    spec["deployments"][-1]["name"] = "nightly-evaluate"
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    problems = prefect_yaml_mismatches(tmp_path / "prefect.yaml")
    assert any("no deployment" in p and "'ingest'" in p for p in problems)
    assert any("gone.py" in p for p in problems) and any("nightly-evaluate" in p for p in problems)


@pytest.mark.timeout(600)
def test_prefect_deploy_all_against_a_local_server(prefect_server):
    _prefect(prefect_server, "work-pool", "create", "deltaedit-process", "--type", "process")
    _prefect(prefect_server, "deploy", "--all")
    listing = _prefect(prefect_server, "deployment", "ls")
    inspected = _prefect(prefect_server, "deployment", "inspect", "preprocess/preprocess-nightly")
    assert "preprocess-nightly" in listing and "ingest" in listing
    assert "0 2 * * *" in inspected and "configs/toy.yaml" in inspected
