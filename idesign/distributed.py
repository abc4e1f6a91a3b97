"""The same code on several processes: ``jax.distributed`` start-up, per-process data, host gathers.

JAX runs one *controller* per host (process); every process runs the same program, and a jitted
function over arrays laid out on a global :class:`~jax.sharding.Mesh` runs on every device of every
process at once, with the collectives XLA inserts. idesign's transforms are ordinary jitted
functions over pytrees, so they work on a global mesh unchanged; this module adds only what differs
between one process and several:

* :func:`initialize` — ``jax.distributed.initialize`` with CPU collectives (gloo) switched on, a
  bounded wait for the coordinator with a clear message, and a check that every process runs the
  same configuration (:func:`check_same_config`: a hash exchanged at start).
* :func:`process_batch` / :func:`process_batches` — each process reads only its slice of the global
  batch of a ``datasets.Dataset``, deterministically from the step; :func:`global_batch` turns the
  slices into one global array per column (``jax.make_array_from_process_local_data``).
* :func:`to_host` — the value of a global array on every process (an all-gather when it spans
  non-local devices; a plain copy otherwise).
* :func:`run_local_processes` — start N processes on this machine, each with simulated CPU devices,
  wired to one coordinator on a free loopback port: how the tests (and users) check multi-host code
  on a laptop.

The recipe, on every host::

    ids.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=int(os.environ["RANK"]),
                               config=my_config)
    mesh = ids.sharding.make_mesh(model=4)                # over jax.devices(): every process's devices
    params = ids.sharding.shard_params(params, mesh)      # same seed on every host → same values
    for batch in ids.distributed.process_batches(dataset, 256, mesh, seed=0):
        state, metrics = step(state, batch)               # gradients are reduced across hosts by XLA

Checkpoints need nothing extra: orbax writes each process's shards and one process the metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from idesign._types import PyTree


class ProcessInfo(NamedTuple):
    """Where this process stands: ``process_index`` of ``process_count``, its devices and the config hash."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    config_hash: str | None


# --- start-up --------------------------------------------------------------------------------------


def has_cpu_collectives() -> tuple[bool, str]:
    """Whether this jax can run collectives across CPU processes, and why not if it cannot.

    >>> import idesign as ids
    >>> ok, why = ids.distributed.has_cpu_collectives()
    >>> isinstance(ok, bool) and isinstance(why, str)
    True
    """
    try:
        jax.config.jax_cpu_collectives_implementation  # noqa: B018 - probing for the option
    except AttributeError:
        return False, f"jax {jax.__version__} has no 'jax_cpu_collectives_implementation' option (gloo)."
    try:
        from jax._src.lib import _jax as _xla  # noqa: F401  # jaxlib >= 0.7
        make = getattr(_xla, "make_gloo_tcp_collectives", None)
    except ImportError:  # pragma: no cover - older layouts
        from jax._src.lib import xla_client as _xla
        make = getattr(_xla._xla, "make_gloo_tcp_collectives", None)
    if make is None:
        return False, f"jaxlib {jax.__version__} was built without gloo CPU collectives."
    return True, ""


def initialize(coordinator_address: str, num_processes: int, process_id: int, *, timeout_s: float = 60.0,
               config: Any = None, cpu_collectives: str = "gloo") -> ProcessInfo:
    """Joins this process to a multi-process JAX run; call it on every process before any other JAX call.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator service (process 0 starts it).
      num_processes: how many processes take part.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      timeout_s: how long to wait for the coordinator and the other processes before giving up.
      config: anything JSON-like (dataclasses, dicts, numbers, strings); when given, every process
        checks that all of them run the same one (:func:`check_same_config`).
      cpu_collectives: the CPU collectives implementation (``'gloo'``); ignored off the CPU.

    Returns:
      A :class:`ProcessInfo`.

    Raises:
      ValueError: a bad address, process count or id (named).
      TimeoutError: the coordinator did not answer within ``timeout_s`` (on processes other than 0). On
        process 0, a peer that never joins makes jax stop the process at the deadline; a message on
        stderr says why just before.
      RuntimeError: the processes run different configs (each process's hash is listed).
    """
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator_address = {coordinator_address!r}: expected 'host:port', e.g. '127.0.0.1:1234'.")
    if not (isinstance(num_processes, (int, np.integer)) and num_processes >= 1):
        raise ValueError(f"num_processes = {num_processes!r}: expected an integer >= 1.")
    if not (isinstance(process_id, (int, np.integer)) and 0 <= process_id < num_processes):
        raise ValueError(f"process_id = {process_id!r}: expected an integer in [0, {num_processes}).")
    if jax.config.jax_platforms in (None, "", "cpu") or str(jax.config.jax_platforms).startswith("cpu"):
        ok, why = has_cpu_collectives()
        if not ok:
            raise RuntimeError(f"cannot run several CPU processes: {why}")
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    deadline = time.monotonic() + timeout_s
    if process_id != 0:
        # jax's client aborts the whole process (no Python exception) when the coordinator is unreachable, so
        # wait for the coordinator's port ourselves first and fail with a message that says what to do.
        _wait_for_port(host, int(port), deadline, coordinator_address, process_id, num_processes, timeout_s)
    # Process 0 hosts the coordinator; if a peer never joins, jax aborts it at the deadline. Say why, first.
    watchdog = threading.Timer(max(0.0, timeout_s - 0.5), lambda: print(
        f"idesign.distributed: process {process_id} of {num_processes} waited {timeout_s:g} s at {coordinator_address} "
        "for the other processes to join; they did not all arrive, and jax will now stop this process. Check that "
        f"every process was started with num_processes={num_processes} and a distinct process_id.",
        file=sys.stderr, flush=True))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=int(num_processes),
                                   process_id=int(process_id),
                                   initialization_timeout=max(1, int(deadline - time.monotonic())))
    finally:
        watchdog.cancel()
    config_hash = check_same_config(config) if config is not None else None
    return process_info(config_hash)


def _wait_for_port(host: str, port: int, deadline: float, address: str, process_id: int, num_processes: int,
                   timeout_s: float) -> None:
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"process {process_id} of {num_processes}: the coordinator at {address} did not answer within "
                    f"{timeout_s:g} s. Start process 0 (it hosts the coordinator) with the same address, and check that "
                    "the host and port are reachable from this machine.") from None
            time.sleep(0.2)


def process_info(config_hash: str | None = None) -> ProcessInfo:
    """This process's :class:`ProcessInfo` (also valid without :func:`initialize`: one process).

    >>> import idesign as ids
    >>> info = ids.distributed.process_info()
    >>> info.process_index, info.process_count
    (0, 1)
    """
    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                       config_hash)


def config_hash(config: Any) -> str:
    """A stable hex digest of a plain-data config (dataclasses, dicts in any key order, lists, numbers, strings).

    The same canonical form as the pretrain cache's keys (:func:`idesign.pretrain.canonical_config`).

    >>> import idesign as ids
    >>> ids.distributed.config_hash({'b': 1, 'a': [2, 3]}) == ids.distributed.config_hash({'a': (2, 3), 'b': 1})
    True
    """
    from idesign.pretrain import canonical_config   # not at import time: pretrain sits above this module
    text = json.dumps(canonical_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(config: Any) -> str:
    """Checks that every process passes the same ``config``; returns its hash.

    One process with a different model size, data seed or batch size would otherwise run a
    different program and hang in its first collective, or silently train on other data.

    Raises:
      RuntimeError: naming each process's hash when they differ.

    >>> import idesign as ids
    >>> len(ids.distributed.check_same_config({'lr': 1e-3}))    # one process: nothing to compare
    64
    """
    digest = config_hash(config)
    if jax.process_count() == 1:
        return digest
    from jax.experimental import multihost_utils
    words = np.frombuffer(bytes.fromhex(digest)[:16], dtype=np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words))          # [processes, 4]
    if not (gathered == gathered[0]).all():
        hashes = {p: gathered[p].tobytes().hex() for p in range(gathered.shape[0])}
        raise RuntimeError("the processes were started with different configs (hash prefix per process: "
                           f"{hashes}); process {jax.process_index()} has {digest[:32]}. Start every process "
                           "with the same config.")
    return digest


# --- data ------------------------------------------------------------------------------------------


def process_rows(global_batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None) -> slice:
    """The rows of a global batch that this process loads: a contiguous block, in process order.

    This is the order ``jax.make_array_from_process_local_data`` expects when the mesh's devices are
    ordered by process (as :func:`idesign.sharding.make_mesh` lays them out).

    >>> import idesign as ids
    >>> ids.distributed.process_rows(8, process_index=1, process_count=2)
    slice(4, 8, None)
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
        raise ValueError(f"global_batch_size = {global_batch_size} is not divisible by the {count} processes.")
    per = global_batch_size // count
    return slice(index * per, (index + 1) * per)


def _global_order(n: int, seed: int | None, epoch: int) -> np.ndarray:
    if seed is None:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def process_batch(dataset: Any, step: int, global_batch_size: int, *, seed: int | None = 0,
                  columns: Sequence[str] | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> dict[str, np.ndarray]:
    """This process's rows of the global batch number ``step``, read from ``dataset`` and nothing else.

    The global order is a permutation of the rows per epoch, fixed by ``seed`` and the epoch
    (``seed=None``: dataset order); global batch ``step`` is rows ``[step·B, (step+1)·B)`` of that
    order, epochs following each other with the remainder dropped. So the batches depend only on
    ``(seed, step)``: a run resumed at any step, or on another number of processes, sees the same
    global batches as an uninterrupted one-process run.

    Args:
      dataset: a ``datasets.Dataset`` (only the selected rows are read) or a dict of equal-length arrays.
      step: the global step (batch number), ``>= 0``.
      global_batch_size: rows in the global batch (divisible by the process count).
      seed: shuffling seed, or ``None`` for dataset order.
      columns: the columns to read (default: all).

    Returns:
      ``{column: array}`` with ``global_batch_size / process_count`` rows.

    >>> import numpy as np, idesign as ids
    >>> data = {'x': np.arange(10)}
    >>> ids.distributed.process_batch(data, 1, 4, seed=None, process_index=1, process_count=2)['x']
    array([6, 7])
    """
    n = len(dataset) if hasattr(dataset, "column_names") else len(next(iter(dataset.values())))
    if not (isinstance(step, (int, np.integer)) and step >= 0):
        raise ValueError(f"step = {step!r}: expected an integer >= 0.")
    if global_batch_size > n:
        raise ValueError(f"global_batch_size = {global_batch_size} is larger than the dataset ({n} rows).")
    per_epoch = n // global_batch_size
    epoch, within = divmod(int(step), per_epoch)
    rows = _global_order(n, seed, epoch)[within * global_batch_size:(within + 1) * global_batch_size]
    mine = rows[process_rows(global_batch_size, process_index=process_index, process_count=process_count)]
    if hasattr(dataset, "column_names"):
        names = list(columns or dataset.column_names)
        part = dataset.select_columns(names).select(mine.tolist()).with_format("numpy")
        return {c: np.asarray(part[c]) for c in names}
    names = list(columns or dataset.keys())
    return {c: np.asarray(dataset[c])[mine] for c in names}


def global_batch(local: Mapping[str, Any], mesh: Mesh, axis: str = "data") -> dict[str, jax.Array]:
    """Builds global arrays, sharded over ``mesh``'s ``axis``, from each process's rows.

    With one process this equals :func:`idesign.sharding.shard_batch` of the whole batch.

    >>> import numpy as np, idesign as ids
    >>> b = ids.distributed.global_batch({'tokens': np.zeros((4, 3), np.int32)}, ids.sharding.make_mesh())
    >>> b['tokens'].shape, b['tokens'].sharding.spec
    ((4, 3), P('data',))
    """
    sharding = NamedSharding(mesh, P(axis))
    out = {}
    for name, x in local.items():
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"global_batch: column {name!r} is a scalar; every column needs a leading row axis.")
        out[name] = jax.make_array_from_process_local_data(sharding, x)
    return out


def process_batches(dataset: Any, global_batch_size: int, mesh: Mesh, *, seed: int | None = 0, start_step: int = 0,
                    num_steps: int | None = None, columns: Sequence[str] | None = None) -> Iterator[dict[str, jax.Array]]:
    """Global batches for steps ``start_step, start_step + 1, …``, each process reading only its rows.

    >>> import numpy as np, idesign as ids
    >>> mesh = ids.sharding.make_mesh()
    >>> batches = ids.distributed.process_batches({'x': np.arange(6)}, 2, mesh, seed=None, num_steps=2)
    >>> [b['x'].tolist() for b in batches]
    [[0, 1], [2, 3]]
    """
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        yield global_batch(process_batch(dataset, step, global_batch_size, seed=seed, columns=columns), mesh)
        step += 1


def to_host(tree: PyTree) -> PyTree:
    """Numpy copies of every array in ``tree``, gathered from every process where an array spans several.

    Every process must call it with the same structure (it is a collective when arrays span processes).

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.distributed.to_host({'w': jnp.arange(3)})['w']
    array([0, 1, 2], dtype=int32)
    """
    def gather(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(gather, tree)


# --- several processes on one machine ---------------------------------------------------------------


class ProcessResult(NamedTuple):
    """One process of :func:`run_local_processes`: its index, exit code and output."""

    process_index: int
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now.

    >>> import idesign as ids
    >>> 1024 <= ids.distributed.free_port() < 65536
    True
    """
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_local_processes(args: Sequence[str], *, num_processes: int = 2, devices_per_process: int = 4,
                        timeout_s: float = 300.0, cwd: str | os.PathLike | None = None,
                        env: Mapping[str, str] | None = None) -> list[ProcessResult]:
    """Runs ``python *args`` as ``num_processes`` processes on this machine, wired for :func:`initialize`.

    Each process gets ``devices_per_process`` simulated CPU devices and the environment variables
    ``IDESIGN_COORDINATOR`` (``127.0.0.1:<free port>``), ``IDESIGN_NUM_PROCESSES`` and
    ``IDESIGN_PROCESS_ID``; :func:`initialize_from_env` reads them. The run is bounded: after
    ``timeout_s`` every process still running is killed (its whole process group), and so is every
    process when one fails, so a dead peer cannot leave the others waiting in a collective.

    Returns:
      One :class:`ProcessResult` per process, in process order.

    Raises:
      TimeoutError: the processes did not all finish within ``timeout_s`` (their output is in the message).
    """
    port = free_port()
    # PYTHONFAULTHANDLER: a process that has to be stopped at the deadline is sent SIGABRT first, so it prints
    # every thread's Python stack (where it hung) into the TimeoutError's message before it is killed.
    base = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu", "PYTHONFAULTHANDLER": "1",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={int(devices_per_process)}",
            "IDESIGN_COORDINATOR": f"127.0.0.1:{port}", "IDESIGN_NUM_PROCESSES": str(int(num_processes))}
    procs = [subprocess.Popen([sys.executable, *args], cwd=cwd, env={**base, "IDESIGN_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for i in range(num_processes)]
    outputs: dict[int, tuple[str, str]] = {}
    deadline = time.monotonic() + timeout_s

    def drain(i: int, p: subprocess.Popen) -> None:
        outputs[i] = p.communicate()

    # One reader thread per process: a full stdout pipe must never block a process mid-collective.
    threads = [threading.Thread(target=drain, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        while any(t.is_alive() for t in threads):
            if time.monotonic() > deadline:
                timed_out = True
                _signal_running(procs, signal.SIGABRT)
                for t in threads:                                # the stack dumps reach the pipes
                    t.join(timeout=10)
                break
            if any(p.poll() not in (None, 0) for p in procs):   # one failed: the others would wait forever
                time.sleep(2.0)                                  # let its peers report their own errors first
                break
            time.sleep(0.05)
    finally:
        _signal_running(procs, signal.SIGKILL)
        for p in procs:
            p.wait()
        for t in threads:
            t.join(timeout=5)
    if timed_out:
        raise TimeoutError(f"run_local_processes: {num_processes} processes did not finish within {timeout_s:g} s; "
                           "killed. Their output (a process still running was stopped with SIGABRT, so its stderr "
                           "ends with every thread's Python stack):\n" + _output_tails(outputs, num_processes))
    return [ProcessResult(i, p.returncode, *outputs.get(i, ("", ""))) for i, p in enumerate(procs)]


def _signal_running(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)


def _output_tails(outputs: Mapping[int, tuple[str, str]], num_processes: int, chars: int = 3000) -> str:
    parts = []
    for i in range(num_processes):
        out, err = outputs.get(i, ("", ""))
        parts.append(f"--- process {i} stdout (last {chars} chars) ---\n{(out or '')[-chars:]}\n"
                     f"--- process {i} stderr (last {chars} chars) ---\n{(err or '')[-chars:]}")
    return "\n".join(parts)


def initialize_from_env(*, timeout_s: float = 60.0, config: Any = None) -> ProcessInfo:
    """:func:`initialize` from the variables :func:`run_local_processes` sets (``IDESIGN_COORDINATOR`` …).

    Without them (a plain one-process run) it initialises nothing and returns this process's info.
    """
    if "IDESIGN_COORDINATOR" not in os.environ:
        return process_info(check_same_config(config) if config is not None else None)
    return initialize(os.environ["IDESIGN_COORDINATOR"], int(os.environ["IDESIGN_NUM_PROCESSES"]),
                      int(os.environ["IDESIGN_PROCESS_ID"]), timeout_s=timeout_s, config=config)
