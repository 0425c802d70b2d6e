"""Connecting to Ray: the same entry points run on a laptop and on a cluster."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (``auto``, ``HOST:PORT``; or ``RAY_ADDRESS``, which
    ``ray job submit`` sets), else start a private local Ray.

    A no-op when Ray is already initialised (tests start one per session). A local Ray
    starts without the dashboard, so nothing listens beyond what Ray itself needs.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    log.info("Ray cluster resources: %s", ray.cluster_resources())
