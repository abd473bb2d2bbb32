"""Ray: connect to a cluster and run one job per task on it.

Two users: the benchmark (one task per object, ``recon.bench.runner``) and
the web app (one task per reconstruction, ``recon.app``). The helpers live
here, below both, because only the CLI and ``recon.bench`` itself may import
``recon.bench`` (docs/design.md, "Layers").

A task writes its job's files itself, so on a multi-machine cluster the
folders it reads and writes must be on a filesystem every machine shares, and
recon must be installed on every machine.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from recon.errors import BadInput, one_line

# Each task gets one CPU, and its worker process one compute thread: OpenMP's idle
# threads busy-wait, so two workers with a thread pool each on two cores ran
# several times slower than one worker alone.
TASK_ENV = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def connect(address: Optional[str]) -> bool:
    """Connect this process to Ray: the cluster at ``address``, or a new local one when it is None.

    A process that is already connected keeps its connection (a test's local
    cluster, a program that embeds recon). Returns True when this call made the
    connection, so the caller knows to shut it down again.
    """
    try:
        import ray
    except ImportError:
        raise BadInput("--ray and --ray-address need Ray: pip install 'recon[bench]'") from None
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address) if address else ray.init(include_dashboard=False)
    except ConnectionError as error:  # e.g. "auto" with no cluster running on this machine
        raise BadInput(f"cannot connect to the Ray cluster at {address}: {one_line(error)}") from None
    return True


def has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def task_slots() -> int:
    """How many job tasks the cluster runs at once: one per GPU, or one per CPU on a cluster without GPUs.

    Read now: a cluster that grows later is not seen.
    """
    import ray

    resources = ray.cluster_resources()
    return max(1, int(resources.get("GPU", 0) or resources.get("CPU", 0)))


def remote_task(fn: Callable):
    """``fn`` as the Ray task of one job: one GPU when the cluster has GPUs, else one CPU; one compute thread.

    A task that dies (worker crash, out of memory, cancelled) is not retried:
    its job is reported as failed, like any other failure.
    """
    import ray

    return ray.remote(num_cpus=1, num_gpus=1 if has_gpus() else 0, max_retries=0, runtime_env={"env_vars": TASK_ENV})(fn)


def task_failure(error: BaseException) -> str:
    """One line for a task that died rather than raised: ``ray task failed: WorkerCrashedError: ...``."""
    return f"ray task failed: {type(error).__name__}: {one_line(error)}"


class ProgressBoard:
    """The latest progress report of each running job; lives in a Ray actor (see :func:`progress_board`).

    A task, maybe on another machine, cannot call the app's progress callback.
    It posts each report here without waiting for an answer, and the app asks
    for the latest one every half second. One small actor for all jobs, not a
    queue per job: the page shows only the newest report, and a queue per job
    would start a worker process per job.
    """

    def __init__(self):
        self._latest: Dict[str, Tuple] = {}

    def report(self, job: str, *report) -> None:
        self._latest[job] = report

    def latest(self, job: str) -> Optional[Tuple]:
        return self._latest.get(job)

    def forget(self, job: str) -> None:
        self._latest.pop(job, None)


def progress_board():
    """A :class:`ProgressBoard` actor. It takes no CPU, so it never keeps a job's task from starting."""
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard).remote()
