"""MLflow records of a sweep: one parent run, one child run per Tune trial.

Everything is logged from the Tune driver (a Tune ``Callback``), so trials on other
nodes need no route to the tracking server. The default store is a sqlite file under
the sweep's output directory; ``MLFLOW_TRACKING_URI`` points it at a server instead.

Resuming a sweep reuses its parent run and each trial's child run (found by the tag
``sfda.trial_id``), so a restore never duplicates runs; runs the driver leaves behind
when it stops are closed as KILLED, never left RUNNING.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import cloudpickle
from ray.exceptions import RayTaskError
from ray.tune import Callback

from sfda_ray import storage

log = logging.getLogger(__name__)
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "sfda.trial_id"
ERROR_TAG = "sfda.error"
STEP_TAG = "sfda.logged_step"  # a trial's last logged iteration, for a resumed driver
_TAG_CHARS = 5000  # MLflow keeps tag values up to 8000 characters
_LINE_CHARS = 1000
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# Tune's own bookkeeping, not worth a curve.
_NOT_METRICS = {
    "iteration",
    "training_iteration",
    "iterations_since_restore",
    "time_this_iter_s",
    "time_total_s",
    "time_since_restore",
    "timestamp",
    "pid",
    "done",
    "resumed_from",
}


def describe_error(error: BaseException | str | None) -> str | None:
    """What a trial raised, in a line, without Ray's wrapping and tracebacks (those stay
    in the trial's ``error.txt``): the trial's own exception, or for a failed Ray Train
    run each distinct exception of its workers with their ranks. A string is Tune's text
    of an error it did not pickle (``error.txt``): its latest failure's last line."""
    if error is None:
        return None
    if isinstance(error, str):
        latest = _latest_failure(_ANSI_COLOUR.sub("", error))
        lines = [line.strip() for line in latest.splitlines() if line.strip()]
        return (lines or [error.strip()])[-1][:_LINE_CHARS]
    error = _unwrapped(error)
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError
    if not failures:
        return _exception_line(error)
    ranks: dict[str, list[str]] = {}
    for rank, exc in sorted(failures.items()):
        ranks.setdefault(_exception_line(_unwrapped(exc)), []).append(str(rank))
    return "; ".join(
        f"Ray Train worker{'s' if len(r) > 1 else ''} {', '.join(r)}: {text}"
        for text, r in ranks.items()
    )


def root_causes(error: BaseException) -> list[BaseException]:
    """The exceptions behind one Ray raised: a task's or actor's cause, or each failed
    Train worker's; an exception Ray did not wrap is its own cause."""
    error = _unwrapped(error)
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError
    return [_unwrapped(exc) for _, exc in sorted(failures.items())] if failures else [error]


def _latest_failure(error_txt: str) -> str:
    """The text of the last failure in Tune's ``error.txt``, where each one is written as
    ``Failure # N (occurred at ...)`` and then the error's text."""
    if "Failure # " not in error_txt:
        return error_txt
    return error_txt.rsplit("Failure # ", 1)[-1].partition("\n")[2]


def _unwrapped(error: BaseException) -> BaseException:
    """The innermost exception Ray wrapped: a task's (``RayTaskError.cause``, nested when
    a trial ran a task), the Train controller's, a failed worker health check's."""
    for _ in range(8):
        inner = (
            getattr(error, "cause", None)
            or getattr(error, "controller_failure", None)  # ray.train.ControllerError
            or getattr(error, "health_check_failure", None)  # Train worker lost
        )
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def _exception_line(exc: BaseException) -> str:
    name = type(exc).__name__
    lines = [line for line in _ANSI_COLOUR.sub("", str(exc)).splitlines() if line.strip()]
    if any(line.lstrip().startswith('File "') for line in lines):
        # A traceback in the text (a RayTaskError whose cause did not unpickle, an actor
        # whose constructor raised): its last line is the error.
        last = lines[-1].strip()
        return (last if isinstance(exc, RayTaskError) else f"{name}: {last}")[:_LINE_CHARS]
    # Ray's actor errors put tab-indented "key: value" lines (ids, pid) between sentences.
    text = " ".join(line.strip() for line in lines if line[0] != "\t")
    return f"{name}: {text}"[:_LINE_CHARS] if text else name


def default_tracking_uri(out: str) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite file under ``out``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if storage.is_uri(out):
        raise ValueError(
            f"--out {out} is remote storage, where a sqlite MLflow store cannot live: set "
            "MLFLOW_TRACKING_URI to a tracking server (e.g. http://127.0.0.1:5000)"
        )
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


def check_tracking_store(tracking_uri: str, experiment: str) -> None:
    """Open the tracking store and look up the experiment before any work, so that a wrong
    URI or a deleted experiment fails the job at its start rather than after scoring. An
    unreachable server is retried as MLflow's ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` says
    (minutes by default) before it fails."""
    log.info("checking the MLflow tracking store at %s", tracking_uri)
    try:
        found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    except MlflowException as e:
        raise ValueError(f"MLflow tracking store {tracking_uri}: {e.message}") from e
    if found is not None and found.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {experiment!r} (id {found.experiment_id}) at {tracking_uri} "
            f"is deleted: restore it (`MLFLOW_TRACKING_URI={tracking_uri} mlflow experiments "
            f"restore --experiment-id {found.experiment_id}`) or pass another --experiment"
        )


def git_commit(path: str | Path | None = None) -> str:
    """The commit of the checkout holding ``path`` (this project's by default): with
    ``-dirty`` when tracked files differ from it, ``-unverified`` when git could not tell;
    ``unknown`` outside git, or where git tracks no file of ``path``."""
    # The checkout's own repository, whatever a calling git hook set; and no index lock
    # taken, so a git command the user runs meanwhile does not fail.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")
    }

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=Path(path) if path else Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )

    try:
        head = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("no git commit to tag the runs with: %s", e)
        return "unknown"
    if head.returncode != 0:
        log.warning("no git commit to tag the runs with: %s", head.stderr.strip())
        return "unknown"
    sha = head.stdout.strip()
    # Installed into a virtual environment that another checkout ignores: its files are
    # not that checkout's, nor is its commit.
    try:
        tracked = git("ls-files", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return f"{sha}-unverified"
    if tracked.returncode == 0 and not tracked.stdout.strip():
        log.warning("no git commit to tag the runs with: the code is not tracked by git")
        return "unknown"
    # A run from edited code is not the commit's run: say so rather than let the tag
    # claim the commit reproduces it.
    try:
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return f"{sha}-unverified"
    if changes.returncode != 0:
        return f"{sha}-unverified"
    return sha + ("-dirty" if changes.stdout.strip() else "")


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


class SweepTracker:
    """The parent run of one sweep and the child runs of its trials."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_dir: str, out: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.state_path = storage.join(sweep_dir, "mlflow.json")
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            # A local store keeps artifacts beside it; a server decides for itself.
            location = None
            if tracking_uri.startswith("sqlite:"):
                location = (Path(out).resolve() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment, location)
        self.parent_id: str | None = None
        self.children: dict[str, str] = {}

    # Tune pickles its callbacks with the sweep; the client is rebuilt after unpickling.
    @property
    def client(self) -> MlflowClient:
        if getattr(self, "_client", None) is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "children")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _client=None, children={})

    def start(self, run_name: str, params: dict, tags: dict) -> str:
        """Open the sweep's parent run, or reopen it when the sweep is resumed. ``tags``
        are the sweep's, which its trials' runs carry too."""
        self.tags = tags
        if storage.exists(self.state_path):
            state = json.loads(storage.read_bytes(self.state_path))
            if state.get("tracking_uri") == self.tracking_uri:
                parent = self._find_run(state["parent_run_id"])
                if parent is not None:
                    self.parent_id = state["parent_run_id"]
                    self._reopen(self.parent_id, parent.data.tags)
                    self._save_state()
                    log.info("resuming MLflow run %s", self.parent_id)
                    return self.parent_id
                log.warning(
                    "the sweep's MLflow run %s is not in %s (a new store, e.g. a new head "
                    "whose saved mlflow.db was not restored): the resumed sweep logs to a "
                    "new run",
                    state["parent_run_id"],
                    self.tracking_uri,
                )
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, params)
        self._save_state()
        return self.parent_id

    def _save_state(self) -> None:
        state = {
            "tracking_uri": self.tracking_uri,
            "parent_run_id": self.parent_id,
            "experiment_id": self.experiment_id,
            "tags": self.tags,
        }
        storage.atomic_write_bytes(self.state_path, json.dumps(state).encode())

    def reload(self) -> None:
        """Log where this sweep's driver last started: the parent run, experiment and tags
        of the state file. A resumed sweep's callbacks hold the tracker pickled when the
        sweep was first started, whose run a new store (a new head) does not have."""
        if not storage.exists(self.state_path):
            return
        state = json.loads(storage.read_bytes(self.state_path))
        if state.get("tracking_uri") != self.tracking_uri:
            return
        self.parent_id = state["parent_run_id"]
        self.experiment_id = state.get("experiment_id", self.experiment_id)
        self.tags = state.get("tags", getattr(self, "tags", {}))
        self.children = {}

    def _find_run(self, run_id: str):
        """The run, or None when the store does not have it."""
        try:
            return self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def child(
        self, trial_id: str, run_name: str, params: dict, tags: dict, reopen: bool = True
    ) -> str:
        """The child run of a trial: the existing one (set RUNNING again when ``reopen``,
        as for a resumed trial), else a new one."""
        if trial_id in self.children:
            return self.children[trial_id]
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}' "
            f"and tags.`{TRIAL_TAG}` = '{trial_id}'",
        )
        if runs:
            run_id = runs[0].info.run_id
            if reopen:
                self._reopen(run_id, runs[0].data.tags)
        else:
            all_tags = {**tags, PARENT_TAG: self.parent_id, TRIAL_TAG: trial_id}
            run_id = self.client.create_run(
                self.experiment_id, tags=all_tags, run_name=run_name
            ).info.run_id
            self._log_params(run_id, params)
        self.children[trial_id] = run_id
        return run_id

    def _reopen(self, run_id: str, tags: dict) -> None:
        """Set a run RUNNING again, without the error of its earlier attempt."""
        self.client.update_run(run_id, status="RUNNING")
        if ERROR_TAG in tags:
            self.client.delete_tag(run_id, ERROR_TAG)

    def log_metrics(
        self, run_id: str, metrics: dict[str, float], step: int, tags: dict | None = None
    ) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        run_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(batch), 1), 500):  # tags with the first batch
            self.client.log_batch(
                run_id, metrics=batch[i : i + 500], tags=run_tags if i == 0 else []
            )

    def log_results(self, run_id: str, metrics: dict[str, float]) -> None:
        """A run's result metrics (step 0), each value logged once: a rerun of a finished
        sweep records only what changed, not a second point of every result."""
        logged = self.client.get_run(run_id).data.metrics
        changed = {k: v for k, v in metrics.items() if logged.get(k) != float(v)}
        if changed:
            self.log_metrics(run_id, changed, 0)

    def log_files(
        self, run_id: str, files: dict[str, bytes], artifact_path: str | None = None
    ) -> None:
        if not files:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                Path(tmp, name).write_bytes(data)
            self.client.log_artifacts(run_id, tmp, artifact_path)

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """End the parent run; any child still RUNNING was interrupted and is KILLED.
        ``error``, when given, says why in the parent's ``sfda.error`` tag."""
        if self.parent_id is None:
            return
        if error:
            self.client.set_tag(self.parent_id, ERROR_TAG, error[:_TAG_CHARS])
        for run in self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'"
        ):
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")
        self.client.set_terminated(self.parent_id, status)

    def _log_params(self, run_id: str, params: dict) -> None:
        items = [Param(k, str(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(run_id, params=items[i : i + 100])


def _never_stops_the_sweep(hook):
    """A Tune callback hook whose failure (an MLflow server gone after its retries, a
    locked sqlite store) is logged, not raised: raised, it would stop every trial."""

    @functools.wraps(hook)
    def guarded(self, iteration, trials, trial, *args, **info):
        try:
            hook(self, iteration, trials, trial, *args, **info)
        except Exception as e:
            log.warning("MLflow: %s of trial %s not recorded: %s", hook.__name__, trial.trial_id, e)

    return guarded


class TrialLogger(Callback):
    """Tune callback: a child run per trial, curves per reported step, files at the end.

    ``files_of(trial_id)`` returns the trial's report files (name -> bytes). The trials'
    runs carry the sweep's tags, as its started ``tracker`` holds them.
    """

    def __init__(
        self,
        tracker: SweepTracker,
        fixed: dict,
        files_of: Callable[[str], dict[str, bytes]],
        iterations: int,
    ) -> None:
        self.tracker = tracker
        self.fixed = fixed
        self.files_of = files_of
        self.iterations = iterations
        self.logged_step: dict[str, int] = {}

    # What was logged is read back from MLflow by each driver, never from a pickle.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "logged_step"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, logged_step={})

    def setup(self, **info) -> None:
        # Tune calls this on every fit, a resumed one too, before any trial hook.
        self.tracker.reload()

    def _run(self, trial) -> str:
        params = {**self.fixed, **trial.config}
        return self.tracker.child(trial.trial_id, str(trial), params, self.tracker.tags)

    def _planned_iterations(self, trial) -> int:
        """The iterations the trial's run trains: none for the source-only and AdaBN
        baselines, which report once, at iteration 0."""
        params = {**self.fixed, **trial.config}
        if params.get("adapt.method") in ("source_only", "adabn"):
            return 0
        return params.get("adapt.iterations", self.iterations)

    @_never_stops_the_sweep
    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    @_never_stops_the_sweep
    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id, step = self._run(trial), int(result.get("iteration", 0))
        if trial.trial_id not in self.logged_step:
            tags = self.tracker.client.get_run(run_id).data.tags
            self.logged_step[trial.trial_id] = int(tags.get(STEP_TAG, -1))
        # A trial resumed after its last report was logged reports that step again.
        if step <= self.logged_step[trial.trial_id]:
            return
        metrics = {
            k: v
            for k, v in result.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.tracker.log_metrics(run_id, metrics, step, tags={STEP_TAG: step})
        self.logged_step[trial.trial_id] = step

    @_never_stops_the_sweep
    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        last = (trial.last_result or {}).get("iteration", 0)
        stopped_early = last < self._planned_iterations(trial)
        self.tracker.client.set_tag(run_id, "sfda.stopped_early", str(stopped_early))
        # First: a failed upload must not leave it RUNNING, for finish() to call KILLED.
        self.tracker.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        self.tracker.log_files(run_id, self.files_of(trial.trial_id))

    @_never_stops_the_sweep
    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        self.tracker.client.set_terminated(run_id, "FAILED")  # first: the rest may fail
        error = _latest_error(trial)
        if error:
            self.tracker.client.set_tag(run_id, ERROR_TAG, error[:_TAG_CHARS])
        self.tracker.log_files(run_id, self.files_of(trial.trial_id))


def _latest_error(trial) -> str | None:
    """A trial's latest failure, described, from what Tune has just written next to it on
    the driver's disk: ``error.txt`` (every failure's text) and ``error.pkl`` (the last
    pickled one, which may be an earlier failure's)."""
    text = None
    if trial.error_file and os.path.isfile(trial.error_file):
        text = Path(trial.error_file).read_text(errors="replace")
    pickled = trial.pickled_error_file
    if pickled and os.path.isfile(pickled):
        with open(pickled, "rb") as f:
            error = cloudpickle.load(f)
        if text is None or str(error).strip() == _latest_failure(text).strip():
            return describe_error(error)
    return describe_error(text)
