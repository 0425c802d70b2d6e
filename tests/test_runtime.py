"""Connecting to Ray (in processes of their own, as the test session's Ray is up already),
and freeing what stopped Ray Train runs hold."""

import os
import subprocess
import sys
import textwrap

import pytest

STOPPED_BY_SIGTERM = textwrap.dedent(
    """
    import os, signal, sys, time
    from sfda_ray.cli import exit_code
    from sfda_ray.dist.runtime import init_ray

    init_ray()  # RAY_ADDRESS: the test session's Ray
    try:
        try:
            import ray

            import threading

            # As `ray job stop` stops a job, while the driver waits in Ray (an exception
            # its handler raises there comes out as a plain KeyboardInterrupt).
            @ray.remote(num_cpus=0)
            def wait():
                time.sleep(60)

            threading.Timer(2, os.kill, (os.getpid(), signal.SIGTERM)).start()
            ray.get(wait.remote())
        except KeyboardInterrupt:
            print("closed the runs", flush=True)  # the job's `finish("KILLED")`
            raise
    except BaseException as e:
        sys.exit(exit_code("job", e, "interrupted; rerun the same command to resume"))
    """
)


def test_sigterm_unwinds_a_ray_driver_as_ctrl_c_does(ray_session):
    """ray.init makes SIGTERM exit at once (status 15); the job's runs would be FAILED.
    The driver joins the test session's Ray: init_ray installs its handler whether it
    starts a Ray or joins one."""
    proc = subprocess.run(
        [sys.executable, "-c", STOPPED_BY_SIGTERM],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address},
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stdout == "closed the runs\n"
    assert "job: stopped by SIGTERM; rerun the same command to resume" in proc.stderr


def test_workers_a_fixed_cluster_can_never_place_are_refused(
    ray_session, tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    """Ray would wait for them forever on a Ray this process started (the test session's:
    one node, no GPU); a driver that joined a cluster only says so, as the autoscaler of
    a real one may still add the nodes."""
    from sfda_ray.config import ConfigError, load_config
    from sfda_ray.dist.runtime import check_placeable
    from sfda_ray.dist.train import run_adapt

    check_placeable("adapt", {"CPU": 1.0, "GPU": 0.0}, 2)
    check_placeable("adapt", {"CPU": 1.0}, 2, "STRICT_PACK")
    with pytest.raises(ConfigError, match=r"adapt: 2 worker\(s\) of CPU 1 each \(STRICT_SPREAD\)"):
        check_placeable("adapt", {"CPU": 1.0}, 2, "STRICT_SPREAD")
    with pytest.raises(
        ConfigError, match=r"this process started have CPU \d+, GPU 0, and none will"
    ):
        check_placeable("adapt", {"CPU": 1.0, "GPU": 1.0}, 1)
    with pytest.raises(ConfigError, match=r"CPU 1000 each \(PACK\) cannot be placed"):
        check_placeable("tune trials", {"CPU": 1000.0}, 1)
    # Two DDP ranks on one GPU fail in NCCL's first collective, on any cluster.
    with pytest.raises(ConfigError, match=r"tune trials: 2 workers of GPU 0.5 each: Ray may"):
        check_placeable("tune trials", {"CPU": 1.0, "GPU": 0.5}, 2, "SPREAD")

    scores, _ = tiny_scores
    out = tmp_path / "adapt"
    with pytest.raises(ConfigError, match=r"adapt: 1 worker\(s\) of CPU 1, GPU 1 each"):
        run_adapt(
            load_config(None, {}),
            str(tiny_source_ckpt),
            str(scores),
            str(tiny_benchmark),
            str(out),
            gpus_per_worker=1.0,
        )
    assert not (out / "ray").exists()  # refused before Ray Train started

    import ray

    joined = subprocess.run(
        [sys.executable, "-c", JOINED_CLUSTER],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
    )
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert "adapt: 1 worker(s) of CPU 1, GPU 1 each (PACK) do not fit" in joined.stderr
    # A cluster the driver started itself (experiments/local_cluster.py) gets no nodes.
    assert "own cluster: refused: adapt: 1 worker(s) of CPU 1, GPU 1" in joined.stdout
    assert "SIGTERM handled" in joined.stdout


JOINED_CLUSTER = textwrap.dedent(
    """
    import logging, ray
    from sfda_ray.dist.runtime import check_placeable

    logging.basicConfig()
    ray.init()  # RAY_ADDRESS: the test session's Ray
    check_placeable("adapt", {"CPU": 1.0, "GPU": 1.0}, 1)
    ray.shutdown()

    import signal
    from sfda_ray.config import ConfigError
    from sfda_ray.dist import runtime

    runtime.init_ray(own_cluster=True)  # joined by RAY_ADDRESS, as a cluster it started
    try:
        check_placeable("adapt", {"CPU": 1.0, "GPU": 1.0}, 1)
    except ConfigError as e:
        print("own cluster: refused:", e)
    from sfda_ray.cli import raise_terminated

    if signal.getsignal(signal.SIGTERM) is raise_terminated:
        print("SIGTERM handled")
    """
)


def test_ray_trains_cleaner_frees_a_stopped_trials_run_without_the_state_api(ray_session, tmp_path):
    """As ASHA stops a trial: its actor ends, and with it its Ray Train controller. Ray
    Train's cleaner asks whether the controller lives, here (no dashboard) of the GCS:
    it removes the workers' placement group and exits, within seconds."""
    import time

    import ray

    from sfda_ray.dist.runtime import release_stopped_train_runs

    def wait_in_training(config: dict) -> None:  # says it runs, then waits to be stopped
        from pathlib import Path

        Path(config["running"]).touch()
        time.sleep(600)

    @ray.remote(num_cpus=0)
    class Trial:  # Tune's trial actor, which drives the Ray Train run
        def fit(self, storage: str, running: str) -> None:
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            TorchTrainer(
                wait_in_training,
                train_loop_config={"running": running},
                scaling_config=ScalingConfig(num_workers=1),
                run_config=RunConfig(name="stopped", storage_path=storage),
            ).fit()

    def groups() -> dict[str, str]:
        return {k: v["state"] for k, v in ray.util.placement_group_table().items()}

    def cleaners() -> dict[str, str]:
        actors = ray._private.state.actors().values()
        return {
            a["ActorID"]: a["State"]
            for a in actors
            if a["ActorClassName"] == "PlacementGroupCleaner"
        }

    groups_before, cleaners_before = set(groups()), set(cleaners())
    running = tmp_path / "running"
    trial = Trial.remote()
    try:
        fit = trial.fit.remote(str(tmp_path / "ray"), str(running))
        deadline = time.time() + 120
        while not running.exists():  # its workers run: the group is the cleaner's to watch
            if ray.wait([fit], timeout=0)[0]:
                ray.get(fit)  # raises what failed
            assert time.time() < deadline, "the Ray Train run never started"
            time.sleep(0.2)
        run_groups = set(groups()) - groups_before
        run_cleaners = set(cleaners()) - cleaners_before
        assert len(run_groups) == 1 and len(run_cleaners) == 1
        (group,), (cleaner,) = run_groups, run_cleaners
        assert groups()[group] == "CREATED" and cleaners()[cleaner] == "ALIVE"
        ray.kill(trial)
        deadline = time.time() + 30
        while (groups()[group], cleaners()[cleaner]) != ("REMOVED", "DEAD"):
            assert time.time() < deadline, (groups()[group], cleaners()[cleaner])
            time.sleep(0.2)
    finally:  # a failure leaves no run holding the session's CPUs for the next tests
        ray.kill(trial)
        release_stopped_train_runs()


def test_what_a_stopped_trials_train_run_holds_is_freed(ray_session):
    """Where Ray Train's cleaner does not free a stopped trial's run (its controller died
    before the worker group started, or no State API on a cluster this process did not
    start), the workers' placement group (not detached) would stay until the job ends;
    the sweep's callback removes it. A placement group the driver made, or one a live
    actor holds, is left alone."""
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from sfda_ray.dist.runtime import release_stopped_train_runs
    from sfda_ray.dist.tune import ReleaseStoppedTrainRuns

    @ray.remote(num_cpus=0)
    class Controller:  # makes its workers' placement group, as Ray Train's does
        def start(self):
            self.group = placement_group([{"CPU": 1}])
            ray.get(self.group.ready())
            return self.group.id.hex()

    @ray.remote(num_cpus=0)
    class Trial:  # Tune's trial actor, which drives the controller; the driver has neither
        def start(self):
            self.controller = Controller.remote()
            return ray.get(self.controller.start.remote())

    def state(group_id: str) -> str:
        return ray.util.placement_group_table()[group_id]["state"]

    drivers = placement_group([{"CPU": 0.5}])
    ray.get(drivers.ready())
    trial = Trial.remote()
    group_id = ray.get(trial.start.remote())
    try:
        assert release_stopped_train_runs() == 0  # its controller lives
        assert state(group_id) == "CREATED"
        ray.kill(trial)  # as Tune ends a stopped trial: the controller dies with it
        released = ReleaseStoppedTrainRuns(every_s=0)  # the sweep's callback, each step
        deadline = time.time() + 30
        while state(group_id) != "REMOVED":
            released.on_step_end(iteration=0, trials=[])
            assert time.time() < deadline, "the stopped run's placement group was kept"
            time.sleep(0.2)
        assert state(drivers.id.hex()) == "CREATED"
    finally:
        remove_placement_group(drivers)
