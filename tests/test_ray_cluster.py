"""Placing actor pools: GPUs per actor (``auto`` shares the cluster's GPUs), a clear error instead
of an endless wait, the project's code shipped to the workers of a cluster the driver attaches to,
and stages on a real two-node cluster."""

from __future__ import annotations

import time

import pytest
from helpers_ray import other_ray, start_local_ray
from helpers_store import make_catalog

from infra.config import IngestConfig, RayConfig
from infra.runtime.ray_pool import (
    PACKAGES,
    ActorPool,
    PoolPlacementError,
    actor_bundle,
    gpus_per_actor,
    placement_problem,
    runtime_env,
)
from infra.runtime.shards import plan_shards
from infra.storage.catalog import list_images
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from tasks.ingest import IngestBuilder

INGEST = IngestBuilder(IngestConfig(image_size=16))


# --- sizing and the placement check, without a cluster ------------------------------------


@pytest.mark.parametrize(
    "gpus, actors, share",
    [
        (0, 2, 0.0),
        (1, 2, 0.5),
        (1, 3, 0.3333),
        (2, 3, 0.5),
        (2, 2, 1.0),
        (8, 2, 1.0),
        (1.5, 2, 0.5),
    ],
)
def test_auto_shares_the_cluster_gpus_so_every_actor_fits(gpus, actors, share):
    cfg = RayConfig(actors=actors)
    assert gpus_per_actor(cfg, cluster_gpus=gpus) == share
    if gpus:
        nodes = [{"CPU": 16.0, "GPU": float(gpus)}]
        assert placement_problem(actors, actor_bundle(cfg, share), nodes) is None


def test_configured_gpus_win_and_auto_can_be_switched_off():
    assert gpus_per_actor(RayConfig(gpus_per_actor=0.25), cluster_gpus=0) == 0.25
    assert gpus_per_actor(RayConfig(use_gpu_if_available=False), cluster_gpus=4) == 0.0
    assert actor_bundle(RayConfig(cpus_per_actor=0.5, resources_per_actor={"slot": 1}), 0.0) == {
        "CPU": 0.5,
        "slot": 1,
    }


def test_an_impossible_pool_is_described():
    one_gpu_host = [{"CPU": 2.0, "GPU": 1.0, "memory": 1e9}]
    message = placement_problem(2, {"CPU": 0.5, "GPU": 1.0}, one_gpu_host)
    assert "asks for 2 actors × CPU 0.5, GPU 1 (CPU 1, GPU 2 in all)" in message
    assert "1 node(s) (CPU 2, GPU 1) hold at most 1 of them" in message
    # a fraction of a GPU comes from one GPU: two 1-GPU nodes hold two 0.6-GPU actors, not three
    two_nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert placement_problem(2, {"CPU": 1.0, "GPU": 0.6}, two_nodes) is None
    assert "at most 2" in placement_problem(3, {"CPU": 1.0, "GPU": 0.6}, two_nodes)
    assert "slot 0" in placement_problem(1, {"CPU": 1.0, "slot": 1.0}, [{"CPU": 4.0}])


def test_code_is_shipped_when_attaching_to_a_cluster():
    assert "py_modules" not in runtime_env(RayConfig())
    env = runtime_env(RayConfig(address="127.0.0.1:6379"))
    assert [m.rsplit("/", 1)[1] for m in env["py_modules"]] == list(PACKAGES)
    assert "__pycache__" in env["excludes"]
    assert "py_modules" not in runtime_env(RayConfig(address="auto", ship_code=False))


# --- a real local cluster that declares one GPU (actors run CPU code while holding it) ------


@pytest.fixture(scope="module")
def one_gpu_host():
    with other_ray(lambda: start_local_ray(num_gpus=1)):
        yield


def _specs(tmp_path, n: int = 4):
    make_catalog(tmp_path / "c", n)
    return plan_shards(list_images(str(tmp_path / "c")), 2)


@pytest.mark.timeout(300)
def test_two_actors_share_the_gpu_of_a_one_gpu_host(one_gpu_host, tmp_path):
    specs = _specs(tmp_path)
    with ActorPool(str(tmp_path / "run"), {}, RayConfig(actors=2, cpus_per_actor=0.5)) as pool:
        assert pool.bundle == {"CPU": 0.5, "GPU": 0.5}
        reports = list(pool.load(INGEST).map(specs))
        assert len(pool.nodes) == 2
    assert sorted(r.outcome for r in reports) == ["ran", "ran"]
    assert StageStore(Location(str(tmp_path / "run")), "images").finished() == ["00000", "00001"]


@pytest.mark.parametrize(
    "cfg, asked",
    [
        (RayConfig(actors=2, gpus_per_actor=1), "2 actors × CPU 0.5, GPU 1"),
        (RayConfig(actors=1, cpus_per_actor=3), "1 actors × CPU 3, GPU 1"),
        (RayConfig(actors=1, gpus_per_actor=2), "1 actors × CPU 0.5, GPU 2"),
    ],
)
def test_a_pool_the_cluster_cannot_hold_fails_at_once(one_gpu_host, tmp_path, cfg, asked):
    start = time.perf_counter()
    with pytest.raises(PoolPlacementError) as info:
        ActorPool(str(tmp_path / "run"), {}, cfg)
    assert asked in str(info.value) and "(CPU 2, GPU 1)" in str(info.value)
    assert time.perf_counter() - start < 10


@pytest.mark.timeout(300)
def test_a_pool_a_busy_cluster_does_not_place_fails_after_its_timeout(one_gpu_host, tmp_path):
    import ray

    @ray.remote(num_cpus=0, num_gpus=1)
    class Holder:
        def ping(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ping.remote())  # the GPU is taken
    try:
        cfg = RayConfig(actors=1, gpus_per_actor=1, ready_timeout_s=3)
        with ActorPool(str(tmp_path / "run"), {}, cfg) as pool:
            expected = "1 of 1 actors .* not placed within .*GPU 0 free"
            with pytest.raises(PoolPlacementError, match=expected):
                pool.load(INGEST)
    finally:
        ray.kill(holder)


# --- a real two-node cluster: `ray start` processes, one actor slot per node ---------------

NODES = [{"node_a": 1, "slot": 1}, {"node_b": 1, "slot": 1}]
ONE_PER_NODE = ["ray.actors=2", "ray.cpus_per_actor=0.5", "ray.resources_per_actor={slot: 1}"]


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node (1 CPU and one ``slot`` each: a pool of 2 actors that each need a
    slot has one actor on each node); stopped by their process groups afterwards."""
    from helpers_ray import start_nodes

    cluster = start_nodes(NODES, cpus=1)
    yield cluster
    cluster.stop()


def _attached(cluster) -> RayConfig:
    return RayConfig(
        address=cluster.address, actors=2, cpus_per_actor=0.5, resources_per_actor={"slot": 1}
    )


def _shipped_code_on(node: str) -> str:
    """Where a task on ``node`` imports this project's ``infra`` from."""
    import ray

    @ray.remote(num_cpus=0)
    def where() -> str:
        import infra

        return infra.__file__

    return ray.get(where.options(resources={node: 0.01}).remote())


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("ray_cluster")
def test_ingest_across_two_nodes_writes_the_one_node_store(two_nodes, tmp_path, monkeypatch):
    from helpers_pipeline import store_snapshot
    from helpers_ray import wait_alive

    from infra.runtime.ray_pool import init_ray

    specs = _specs(tmp_path, 8)
    with ActorPool(str(tmp_path / "one"), {}, RayConfig(actors=2)) as pool:
        list(pool.load(INGEST).map(specs))
    monkeypatch.chdir(tmp_path)  # Ray puts the driver's directory first on workers' sys.path
    with other_ray(lambda: init_ray(_attached(two_nodes))):
        assert len(wait_alive(2)) == 2
        with ActorPool(str(tmp_path / "two"), {}, _attached(two_nodes)) as pool:
            reports = list(pool.load(INGEST).map(specs))
            assert len(set(pool.nodes)) == 2  # one actor on each node
        # the code the driver shipped (runtime_env), not the node's own install
        assert "runtime_resources" in _shipped_code_on("node_b")
    assert sorted(r.outcome for r in reports) == ["ran"] * 4
    one, two = store_snapshot(tmp_path / "one"), store_snapshot(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 4 * 3
    assert [k for k in one if one[k] != two[k]] == []


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_preprocess_across_two_nodes_writes_the_one_node_stores(two_nodes, tmp_path, monkeypatch):
    from helpers_pipeline import store_snapshot, tiny_zoo

    from flows.preprocess import preprocess_flow

    make_catalog(tmp_path / "catalog", 8)
    base = [
        f"ingest.source={tmp_path / 'catalog'}",
        "ingest.shard_size=2",
        "ingest.image_size=32",
        "sample.n=4",
        "sample.shard_size=2",
        "prefect.retries=0",
        "device=cpu",
        *tiny_zoo(tmp_path / "zoo"),
    ]
    one = preprocess_flow(None, [f"root={tmp_path / 'one'}", "ray.actors=2", *base])
    monkeypatch.chdir(tmp_path)  # Ray puts the driver's directory first on workers' sys.path
    with other_ray(lambda: None):  # the flow attaches to the cluster itself
        two = preprocess_flow(
            None,
            [f"root={tmp_path / 'two'}", f"ray.address={two_nodes.address}", *ONE_PER_NODE, *base],
        )
        assert "runtime_resources" in _shipped_code_on("node_b")
    assert {s: r["ok"] for s, r in one.items()} == {s: r["ok"] for s, r in two.items()}
    assert two["images"]["ok"] == 8 and two["clip_samples"]["ok"] == 4
    a, b = store_snapshot(tmp_path / "one"), store_snapshot(tmp_path / "two")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
