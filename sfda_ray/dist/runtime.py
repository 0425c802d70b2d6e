"""Connecting to Ray: the same entry points run on a laptop and on a cluster."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import ray

from sfda_ray.cli import raise_terminated
from sfda_ray.config import ConfigError

log = logging.getLogger(__name__)


_own_cluster = False  # see init_ray's own_cluster


def init_ray(
    address: str | None = None, num_cpus: int | None = None, own_cluster: bool = False
) -> None:
    """Join the cluster at ``address`` (``auto``, ``HOST:PORT``; or ``RAY_ADDRESS``, which
    ``ray job submit`` sets), else start a private local Ray.

    A no-op when Ray is already initialised (tests start one per session). A local Ray
    starts without the dashboard, so nothing listens beyond what Ray itself needs.
    ``own_cluster``: the cluster at ``address`` is one this process started, without a
    dashboard, and no node will join it (``experiments/local_cluster.py``).
    """
    global _own_cluster
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=no_dashboard_runtime_env() if own_cluster else None)
        _own_cluster = own_cluster
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=no_dashboard_runtime_env(),
        )
    log.info("Ray cluster resources: %s", ray.cluster_resources())
    if threading.current_thread() is threading.main_thread():
        # In place of ray.init's handler, which exits at once (status 15) and so records
        # an interrupted sweep as FAILED.
        signal.signal(signal.SIGTERM, raise_terminated)


def _actor_state_from_gcs(
    id: str, address: str | None = None, timeout: int | None = None, _explain: bool = False
) -> SimpleNamespace | None:
    """``ray.util.state.get_actor`` for what Ray Train asks of it, an actor's state, read
    from the GCS's actor table: a Ray without the dashboard has no State API to ask."""
    from ray.util.state.exception import RayStateApiException

    try:
        info = ray._private.state.actors(id)
    except Exception as e:  # the caller retries on this one
        raise RayStateApiException(f"actor {id}: {e}") from e
    return SimpleNamespace(state=info["State"]) if info else None


def _without_state_api() -> None:
    """Setup of every worker process of a Ray without the dashboard (a local one,
    ``local_cluster.py``). Ray Train's placement-group cleaner, a detached actor, asks the
    State API every second whether its run's controller lives; without it, the cleaner
    never learns that a controller died with its trial (an ASHA stop), so it would idle
    until the job ends, and the controller's placement group, with its workers' CPUs and
    GPUs, would be kept for as long: the next trial would wait for them forever. Given
    the GCS's answer instead, it removes the group and exits, as it does on a cluster
    with a dashboard. (Bound here, before Ray Train imports the name.)"""
    import ray.util.state

    ray.util.state.get_actor = _actor_state_from_gcs


def release_stopped_train_runs() -> int:
    """Free the CPUs and GPUs the Ray Train runs of stopped trials still hold; returns the
    number of placement groups removed.

    Tune stops a trial (ASHA) by ending its actor, and with it the Ray Train controller
    the trial drove. The controller's placement group is not detached, so Ray keeps it,
    and its workers' CPUs and GPUs, until the job ends, unless Ray Train's cleaner (a
    detached actor) removes it. The cleaner cannot when it never heard of the group or of
    the controller's death: a controller that died before its worker group started (the
    cleaner's start and the group's registration are calls the controller makes, lost
    with it), or a cluster without the dashboard that this process did not start (no
    State API, see ``_without_state_api``). The next trial would then wait for those
    CPUs forever. So a placement group an actor created (a driver's own have no creating
    actor) whose creator is dead is removed here, from the GCS's table.
    """
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table = ray._private.state.state._connect_and_get_accessor().get_placement_group_table()
    removed = 0
    for raw in table:
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (
            group.state == gcs_pb2.PlacementGroupTableData.REMOVED
            or group.is_detached
            or ray.ActorID(group.creator_actor_id).is_nil()  # a driver's
            or not group.creator_actor_dead
        ):
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
        removed += 1
    return removed


def no_dashboard_runtime_env() -> dict:
    """The runtime env of a driver of a Ray started without its dashboard (a local one,
    ``local_cluster.py``); a new dict each time, as ``ray.init`` rewrites the one given."""
    return {"worker_process_setup_hook": _without_state_api}


def check_placeable(
    what: str, per_worker: dict[str, float], workers: int, strategy: str = "PACK"
) -> None:
    """Refuse, before any work, workers a Ray this process started (a laptop's, a test's)
    can never place: nothing adds nodes to it, and Ray would wait for them forever. On a
    cluster joined by address, nodes may still come (the autoscaler starts GPU nodes
    when asked): a request its nodes cannot hold now is only logged. Several workers
    sharing GPUs are refused wherever they run."""
    gpus = per_worker.get("GPU", 0)
    if workers > 1 and 0 < gpus < 1:
        raise ConfigError(
            f"{what}: {workers} workers of GPU {gpus:g} each: Ray may place two of them on "
            "one GPU, where NCCL refuses to run them (Duplicate GPU detected); give each "
            "worker a whole GPU, or run one worker"
        )
    wanted = {name: amount for name, amount in per_worker.items() if amount > 0}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    # Workers each node can hold, by the scarcest resource asked for.
    room = [min(int(node.get(r, 0) // a) for r, a in wanted.items()) for node in nodes]
    if strategy == "STRICT_SPREAD":
        placeable = sum(1 for n in room if n > 0)
    elif strategy == "STRICT_PACK":
        placeable = max(room, default=0)
    else:
        placeable = sum(room)
    if placeable >= workers:
        return
    asked = ", ".join(f"{r} {a:g}" for r, a in wanted.items())
    have = "; ".join(", ".join(f"{r} {node.get(r, 0):g}" for r in wanted) for node in nodes)
    # A Node object with head=True: this process started the Ray it is connected to.
    if _own_cluster or getattr(ray._private.worker._global_node, "head", False):
        raise ConfigError(
            f"{what}: {workers} worker(s) of {asked} each ({strategy}) cannot be placed: "
            f"the nodes of the Ray this process started have {have or 'nothing'}, and "
            "none will join it"
        )
    log.warning(
        "%s: %d worker(s) of %s each (%s) do not fit the cluster's nodes now (%s): "
        "waiting for nodes to join (the autoscaler's, if the cluster has one)",
        what,
        workers,
        asked,
        strategy,
        have,
    )


def on_gpus(fn: Callable[..., Any], num_gpus: float, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, device=..., **kwargs)`` where a model belongs: in a Ray task holding
    ``num_gpus`` GPUs when the job's workers use GPUs (the driver and Tune's trial
    processes hold none, so their own device would be a CPU), else here on the CPU."""
    if num_gpus <= 0:
        return fn(*args, device="cpu", **kwargs)
    task = ray.remote(num_cpus=1, num_gpus=num_gpus)(fn)
    return ray.get(task.remote(*args, device="cuda", **kwargs))
