"""Shared fixtures: an isolated Prefect home + test harness, one local Ray cluster, a real S3 server
(moto's, on 127.0.0.1) and a run-root factory that yields the same test on disk and on S3."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

# Offline, isolated settings before prefect/ray are imported anywhere.
_HOME = Path(tempfile.mkdtemp(prefix="deltaedit-tests-"))
atexit.register(
    shutil.rmtree, _HOME, ignore_errors=True
)  # each session's Prefect home goes with it
os.environ.setdefault("PREFECT_HOME", str(_HOME / "prefect"))
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(_HOME / "prefect" / "storage"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (real server, local SQLite)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster shared by every test that needs one."""
    import ray
    from helpers_ray import start_local_ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; yields the storage options s3fs needs."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; yields (s3://bucket, storage_options)."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": s3_server["endpoint_url"]}, key="testing", secret="testing"
    )
    fs.mkdir(name)
    return f"s3://{name}", {
        "client_kwargs": {"endpoint_url": s3_server["endpoint_url"]},
        "key": "testing",
        "secret": "testing",
    }


@pytest.fixture(params=["local", "s3"])
def run_root(request, tmp_path):
    """(root URI, storage options) on local disk and on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "run"), {}
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"{bucket}/run", options
