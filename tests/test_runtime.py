"""Connecting to Ray, in a process of its own (the test session's Ray is already up)."""

import os
import subprocess
import sys
import textwrap

STOPPED_BY_SIGTERM = textwrap.dedent(
    """
    import os, signal, sys, time
    from sfda_ray.cli import exit_code
    from sfda_ray.dist.runtime import init_ray

    init_ray(num_cpus=1)
    try:
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # as `ray job stop` stops a job
            time.sleep(60)
        except KeyboardInterrupt:
            print("closed the runs", flush=True)  # the job's `finish("KILLED")`
            raise
    except BaseException as e:
        sys.exit(exit_code("job", e, "interrupted; rerun the same command to resume"))
    """
)


def test_sigterm_unwinds_a_ray_driver_as_ctrl_c_does():
    """ray.init makes SIGTERM exit at once (status 15); the job's runs would be FAILED."""
    proc = subprocess.run(
        [sys.executable, "-c", STOPPED_BY_SIGTERM],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stdout == "closed the runs\n"
    assert "job: stopped by SIGTERM; rerun the same command to resume" in proc.stderr
