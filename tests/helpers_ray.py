"""Ray clusters for tests: the session's local one, one with declared resources, and a real
multi-node cluster of `ray start` processes on this machine (each node with its own resources)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKER_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "RAY_AUTH_MODE")
RAY = str(Path(sys.executable).with_name("ray"))


def start_local_ray(**resources: Any) -> None:
    """The session's local cluster: 2 CPUs (plus ``resources``, e.g. ``num_gpus=1``)."""
    import ray

    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    ray.init(
        num_cpus=resources.pop("num_cpus", 2),
        include_dashboard=False,
        configure_logging=False,
        runtime_env={"env_vars": env},
        **resources,
    )


@contextlib.contextmanager
def other_ray(start: Callable[[], None]) -> Iterator[None]:
    """The block runs on the cluster ``start`` makes; then the session gets its local one back."""
    import ray

    was_up = ray.is_initialized()
    ray.shutdown()
    try:
        start()
        yield
    finally:
        ray.shutdown()
        if was_up:
            start_local_ray()


@dataclass
class RayNodes:
    """`ray start --block` processes, each in its own process group (stopped by that group's id)."""

    address: str
    temp_dir: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def stop(self, grace_s: float = 5.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in reversed(self.procs):  # workers first, the head last
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            deadline = time.time() + grace_s
            while time.time() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.2)
        for proc in self.procs:
            proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _node_args(cpus: float, resources: dict[str, float], gpus: int = 0) -> list[str]:
    from conftest import free_port

    return [
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        f"--num-gpus={gpus}",
        f"--resources={json.dumps(resources)}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
    ]


def start_nodes(nodes: list[dict[str, float]], cpus: float = 1, timeout_s: float = 120) -> RayNodes:
    """A head and one more node per extra entry of ``nodes`` (each entry: that node's custom
    resources); returns once every node has started (``wait_alive`` in the driver)."""
    from conftest import free_port

    port = free_port()
    cluster = RayNodes(f"127.0.0.1:{port}", tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [
        "--head",
        f"--port={port}",
        "--include-dashboard=false",
        f"--temp-dir={cluster.temp_dir}",
    ]
    try:
        for n, resources in enumerate(nodes):
            role = head if n == 0 else [f"--address={cluster.address}"]
            log = Path(cluster.temp_dir) / f"node{n}.log"
            with open(log, "wb") as out:
                cluster.procs.append(
                    subprocess.Popen(
                        [RAY, "start", *role, *_node_args(cpus, resources)],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            _wait_for_line(log, "Ray runtime started", cluster.procs[-1], timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"no '{text}' in {log} after {timeout_s:g} s")


def wait_alive(count: int, timeout_s: float = 60) -> list[dict[str, Any]]:
    """The live nodes of the cluster this process is attached to, once there are ``count``."""
    import ray

    deadline = time.time() + timeout_s
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= count or time.time() > deadline:
            return alive
        time.sleep(0.5)
