"""The main job on a real 2-node Ray cluster started on this machine.

Head and worker are separate raylet processes on 127.0.0.1 (``ray.cluster_utils.Cluster``),
so scheduling, object transfer and DDP go through the same code paths as on a real
cluster; the output directory plays the part of shared storage (S3 on a cluster):

    python experiments/local_cluster.py --smoke [--out outputs/local_cluster]

Scoring places one actor on each node; each of the 2 tuning trials is a Ray Train
run of 2 workers placed one per node (STRICT_SPREAD). The script prints where each stage ran
and writes OUT/cluster_check.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from sfda_ray.cli import add_tune_args
from sfda_ray.dist.job import job_exit_code, run_job
from sfda_ray.dist.runtime import init_ray

CLUSTER_SETTINGS = [
    "score.actors=2",  # one per node
    "tune.num_samples=2",
    "tune.max_concurrent=1",
    "tune.workers_per_trial=2",
    "tune.placement_strategy=STRICT_SPREAD",  # a worker on each node, never both on one
]


def wait_until_schedulable(nodes: list[str], timeout_s: float = 120.0) -> None:
    """Block until SPREAD tasks reach every node. A node counts as joined once the GCS has
    it, but the head's scheduler may not see its resources for a while; actors placed in
    that window (the scorers, one per node) would all land on the head."""

    @ray.remote(num_cpus=1)
    def node_of_task() -> str:
        return ray.get_runtime_context().get_node_id()

    deadline = time.monotonic() + timeout_s
    while True:
        probes = [
            node_of_task.options(scheduling_strategy="SPREAD").remote() for _ in range(len(nodes))
        ]
        if set(ray.get(probes)) >= set(nodes):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"tasks did not reach every node of {nodes} in {timeout_s:.0f} s")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tune_args(parser, "outputs/local_cluster")
    parser.add_argument("--cpus-per-node", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.set = CLUSTER_SETTINGS + args.set
    args.keep_train_checkpoints = True  # the check lists where the Train workers wrote them

    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": args.cpus_per_node, "include_dashboard": False},
        )
        cluster.add_node(num_cpus=args.cpus_per_node)
        cluster.wait_for_nodes()
        args.address = cluster.address
        # No node will join: workers it can never place are refused, not waited for.
        init_ray(cluster.address, own_cluster=True)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        wait_until_schedulable(nodes)
        summary = run_job(args, "local_cluster")
        # Where the scoring actors ran (the GCS keeps finished actors' records). Which
        # actor scores which batch is Ray Data's choice: a fast scorer may take them all.
        scorer_nodes = sorted(
            info["Address"]["NodeID"]
            for info in ray._private.state.actors().values()
            if "Scorer" in info["ActorClassName"]
        )
    except (Exception, KeyboardInterrupt) as e:  # the main job's exit codes
        code = job_exit_code("local_cluster.py", e)
        if code is None:
            raise
        return code
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()

    out = Path(args.out)
    scored_on = pq.read_table(out / "scores" / "scores.parquet")["node_id"].to_pylist()
    client = MlflowClient(summary["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name(summary["mlflow_experiment"])
    runs = client.search_runs([experiment.experiment_id])
    check = {
        "nodes": nodes,
        "scorer_nodes": scorer_nodes,
        "scored_per_node": {n: scored_on.count(n) for n in sorted(set(scored_on))},
        "trial_train_nodes": {t["trial_id"]: t["train_nodes"] for t in summary["trials"]},
        "checkpoints": sorted(
            str(p.relative_to(out)) for p in out.glob("trials/*/ray/adapt/checkpoint_*")
        ),
        "final_models": sorted(str(p.relative_to(out)) for p in out.glob("trials/*/final.pt")),
        "mlflow_runs": {r.info.run_name: r.info.status for r in runs},
        "mlflow_tracking_uri": summary["mlflow_tracking_uri"],
        "best_miou": summary.get("best_miou"),
    }
    (out / "cluster_check.json").write_text(json.dumps(check, indent=2) + "\n")
    print(f"\nnodes: {len(nodes)}")
    print(f"scoring actors per node: {sorted(Counter(scorer_nodes).values())}")
    print(f"images scored per node: {list(check['scored_per_node'].values())}")
    print(f"nodes per training run: {list(check['trial_train_nodes'].values())}")
    print(f"checkpoints in shared storage: {len(check['checkpoints'])}")
    print(f"MLflow runs: {len(runs)} ({summary['mlflow_tracking_uri']})")
    print(f"check: {out / 'cluster_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
