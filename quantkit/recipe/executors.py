"""Where a run's tasks execute: worker processes on this machine, or a Ray cluster.

Both take a Task, run quantkit.recipe.tasks.execute on it somewhere, and hand back its result or its error; the
driver (quantkit.recipe.runner) decides what runs when and records what finished. Each local task gets a fresh
process: a task's memory (a model's calibration, torch's caches) is returned to the system when it ends,
and a worker never outlives the driver (Linux: it is killed with the driver, so a kill -9 of the run leaves no
orphan writing into the run directory).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import traceback

from quantkit.errors import QuantkitError
from quantkit.recipe.tasks import Task, execute

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class TaskFailed(QuantkitError):
    """A task raised or died; the message names the task."""


def _configure_worker_logging(prefix: str) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"{prefix}%(message)s", force=True)
    logging.getLogger("quantkit").setLevel(logging.INFO)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: a worker may outlive a killed driver until its task ends
        pass


def _local_worker(task: Task, conn) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the driver's to handle: it stops us
    _configure_worker_logging(f"{task.id}: ")
    try:
        result = ("ok", execute(task))
    except QuantkitError as exc:
        result = ("error", str(exc), True)
    except BaseException:  # noqa: BLE001 - everything else goes back whole, with its traceback
        result = ("error", traceback.format_exc(), False)
    conn.send(result)
    conn.close()


def _task_processes():
    """Where local tasks' processes come from: forked from a server that imported torch and quantkit once (a fresh
    process per task without ~3 s of imports each; the server has run nothing, so it holds no threads or state to
    inherit), or spawned where fork is unavailable."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # quantkit first: it sets OpenMP's wait policy before torch loads the runtime
    context.set_forkserver_preload(["quantkit", "torch", "quantkit.recipe.tasks", "quantkit.convert",
                                    "quantkit.evaluation.runner", "quantkit.calib"])
    return context


class LocalExecutor:
    """Up to `jobs` tasks at once, each in its own process."""

    name = "local"
    heavy_limit = 1  # one model's calibration at a time: memory stays that of one

    def __init__(self, jobs: int):
        self.jobs = jobs
        self._context = _task_processes()
        self._running: dict[object, tuple[Task, multiprocessing.Process]] = {}

    def default_threads(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.jobs)

    def submit(self, task: Task) -> None:
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_local_worker, args=(task, writer), name=task.id, daemon=False)
        process.start()
        writer.close()
        self._running[reader] = (task, process)

    @property
    def running(self) -> int:
        return len(self._running)

    def wait(self) -> list[tuple[Task, dict | Exception]]:
        """Block until at least one task ends; (task, result or the exception to raise) of each that did."""
        ready = multiprocessing.connection.wait([*self._running, *(p.sentinel for _, p in self._running.values())])
        finished = []
        for reader in list(self._running):
            task, process = self._running[reader]
            if reader not in ready and process.sentinel not in ready:
                continue
            try:
                message = reader.recv()
            except (EOFError, OSError):
                message = None
            process.join()
            reader.close()
            del self._running[reader]
            finished.append((task, _outcome(task, message, process.exitcode)))
        return finished

    def abort(self) -> None:
        for reader, (_, process) in list(self._running.items()):
            process.kill()
            process.join()
            reader.close()
        self._running.clear()

    def close(self) -> None:
        self.abort()


def _outcome(task: Task, message, exitcode: int | None) -> dict | Exception:
    if message is None:
        how = f"killed by signal {-exitcode}" if exitcode and exitcode < 0 else f"exited with status {exitcode}"
        return TaskFailed(f"{task.id}: the worker {how} (out of memory?); rerun the same command to resume")
    if message[0] == "ok":
        return message[1]
    _, text, expected = message
    return TaskFailed(f"{task.id}: {text}") if expected else RuntimeError(f"{task.id} failed:\n{text}")


def _ray_worker(task: Task):
    _configure_worker_logging("")  # Ray prefixes each forwarded line with the task's name (its id) and pid
    try:
        return ("ok", execute(task))
    except QuantkitError as exc:
        return ("error", str(exc), True)
    except Exception:  # noqa: BLE001
        return ("error", traceback.format_exc(), False)


def _check_reachable(address: str | None) -> None:
    """Fail fast on a HOST:PORT nobody listens on: ray.init retries such an address for about 13 minutes."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or "://" in address or ":" not in address:  # a local instance, "auto", or Ray Client
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except (OSError, ValueError) as exc:
        raise QuantkitError(f"cannot reach the Ray cluster at {address!r} ({exc}); start one with `ray start "
                            "--head` and give its address with --address") from None


class RayExecutor:
    """Tasks as Ray tasks on the cluster at `address` (CPUs = the task's threads; a GPU when it runs on CUDA). The
    run directory, the models and any text files must be at the same paths on every node (a shared filesystem):
    tasks read and write them there. Ray's workers import quantkit as their node's `ray start` found it."""

    name = "ray"
    heavy_limit = None  # each node's memory is its own; Ray places tasks by their resource requests

    def __init__(self, address: str | None):
        try:
            import ray
        except ImportError:
            raise QuantkitError("--executor ray needs Ray: pip install 'ray[default]'") from None
        self._ray = ray
        _check_reachable(address)
        if not sys.stderr.isatty():  # plain forwarded lines in a log file, as the local executor's
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        try:
            # configure_logging=False: Ray leaves the driver's logging (the CLI's handler) alone
            ray.init(address=address, log_to_driver=True, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise QuantkitError(f"cannot connect to the Ray cluster at {address!r} ({exc}); start one with "
                                "`ray start --head` and give its address with --address") from None
        # max_calls=1: a fresh worker process per task, as locally: a task's memory (a model's calibration,
        # torch's caches) goes back to its node when it ends, and no state (cwd, torch threads) carries over.
        self._remote = ray.remote(max_retries=0, max_calls=1)(_ray_worker)
        self._running: dict[object, Task] = {}
        self.jobs = None

    def default_threads(self) -> int:
        """The CPUs of the cluster's smallest node: a task asking for more would wait forever."""
        cpus = [n["Resources"].get("CPU", 0) for n in self._ray.nodes() if n.get("Alive")]
        return max(1, int(min(cpus, default=1)))

    def submit(self, task: Task) -> None:
        gpus = 1 if task.device.startswith("cuda") else 0
        ref = self._remote.options(num_cpus=task.threads, num_gpus=gpus, name=task.id).remote(task)
        self._running[ref] = task

    @property
    def running(self) -> int:
        return len(self._running)

    def wait(self) -> list[tuple[Task, dict | Exception]]:
        ready, _ = self._ray.wait(list(self._running), num_returns=1)
        finished = []
        for ref in ready:
            task = self._running.pop(ref)
            try:
                message = self._ray.get(ref)
            except self._ray.exceptions.RayError as exc:  # the worker died, or Ray lost the task
                finished.append((task, TaskFailed(f"{task.id}: the Ray task failed ({type(exc).__name__}); rerun "
                                                  "the same command to resume")))
                continue
            finished.append((task, _outcome(task, message, None)))
        return finished

    def abort(self) -> None:
        for ref in self._running:
            self._ray.cancel(ref, force=True)
        self._running.clear()

    def close(self) -> None:
        self.abort()
        self._ray.shutdown()
