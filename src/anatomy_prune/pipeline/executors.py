"""Where a sweep's points run: in this process (`local`) or one Ray task each (`ray`, local or a cluster).
An executor runs `fn(spec, point, cache) -> value` (picklable data in and out) for each point and yields an
`Outcome` as each finishes; a failing point never stops the others. `cache` (a ContextCache) lives as long
as the process running the points, so each process loads the model once. Ray (the optional [cluster] extra)
is imported only when a Ray executor starts; setting up a cluster: docs/ray.md.
"""
from __future__ import annotations

import logging
import os
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from ..errors import UserError
from ..runfolder import settings_digest

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "anatomy-prune[cluster]"'
PROBE_TIMEOUT_S = 5.0   # how long the TCP check of --address waits
WAIT_SLICE_S = 1.0      # ray.wait's timeout per round (Ctrl-C stays responsive)

PointFn = Callable[[dict, dict, "ContextCache"], Any]


@dataclass(frozen=True)
class Outcome:
    """One finished point: `value` (what fn returned) or `error` (one line, "Type: message")."""

    index: int
    value: Any = None
    error: str | None = None
    worker: str | None = None   # host:pid that ran it (Ray) or None (this process)
    detail: str | None = None   # the traceback, for --verbose


def one_line(exc: BaseException) -> str:
    """An exception as one line: a UserError's message, else 'Type: message' (its first line)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, UserError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


# --- checks ----------------------------------------------------------------------------------------

def parse_address(address: str) -> tuple[str, int] | None:
    """'HOST:PORT', '[IPv6]:PORT' or 'ray://HOST:PORT' -> (host, port); 'auto' -> None (Ray finds it)."""
    text = str(address).strip()
    if text == "auto":
        return None
    bare = text.split("://", 1)[1] if text.startswith("ray://") else text
    host, sep, port = bare.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise UserError(f"--address '{address}' is not HOST:PORT (e.g. 10.0.0.5:6379, the head's "
                        "`ray start --head --port 6379`), ray://HOST:PORT or auto")
    return host, int(port)


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """A one-line UserError unless something accepts a TCP connection at `address` within `timeout`.
    (ray.init on an address where nothing listens retries for minutes; this answers in seconds.)"""
    where = parse_address(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=timeout):
            pass
    except socket.gaierror as exc:
        raise UserError(f"--address {address}: unknown host '{where[0]}' ({exc.strerror})") from None
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise UserError(f"--address {address}: no Ray cluster reachable there ({why}); start its head with "
                        "`ray start --head --port 6379`, or leave --address out for a local Ray instance") from None


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def make_executor(cfg):
    """The executor a SweepConfig (checked when built) asks for; Ray's import and --address probed, nothing
    started yet."""
    if cfg.executor == "local":
        return LocalExecutor()
    import_ray()
    if cfg.address is not None:
        probe(cfg.address)
    return RayExecutor(cfg.address, cfg.num_cpus_per_task, cfg.num_gpus_per_task, dict(cfg.ray_init or {}))


class ContextCache:
    """One built context at a time, by the digest of its spec: a process that runs several points builds it
    (loads the model, computes statistics) once. The executor owns the driver's; a Ray worker keeps its own."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.value: Any = None

    def get(self, spec: dict, build: Callable[[dict], Any]) -> Any:
        key = settings_digest(spec)
        if key != self.key:
            self.clear()
            self.value, self.key = build(spec), key
        return self.value

    def clear(self) -> None:
        self.key = self.value = None


# --- executors ---------------------------------------------------------------------------------------

class LocalExecutor:
    """The points in order, in this process."""

    kind = "local"

    def __init__(self) -> None:
        self.cache = ContextCache()

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> bool:
        self.cache.clear()   # the model and statistics go with the sweep
        return False

    def info(self) -> dict:
        return {"kind": self.kind}

    def run(self, fn: PointFn, spec: dict, points: Sequence[tuple[int, dict]]) -> Iterator[Outcome]:
        for index, point in points:
            try:
                value = fn(spec, point, self.cache)
            except Exception as exc:  # noqa: BLE001 - a failed point is reported; Ctrl-C still stops the sweep
                yield Outcome(index, error=one_line(exc), detail=traceback.format_exc())
                continue
            yield Outcome(index, value)


_WORKER_CACHE = ContextCache()   # used only inside Ray worker processes (one context per worker)


def _task(fn: PointFn, spec: dict, point: dict, threads: int) -> dict:
    """One point inside a Ray worker: torch threads set to the CPU request; an exception becomes data."""
    import torch

    torch.set_num_threads(threads)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        return {"value": fn(spec, point, _WORKER_CACHE), "worker": worker}
    except Exception as exc:  # noqa: BLE001
        return {"error": one_line(exc), "detail": traceback.format_exc(), "worker": worker}


class RayExecutor:
    """One Ray task per point, each with its CPU / GPU request, collected with ray.wait as they finish. Without
    an address it starts a local Ray instance and shuts it down at the end. Use as a context manager."""

    kind = "ray"

    def __init__(self, address: str | None = None, num_cpus_per_task: float = 1.0, num_gpus_per_task: float = 0.0,
                 ray_init: dict | None = None):
        self.address = address
        self.num_cpus_per_task = num_cpus_per_task
        self.num_gpus_per_task = num_gpus_per_task
        self.ray_init = dict(ray_init or {})
        self.started = False        # this executor started the Ray instance (and shuts it down)
        self.workers: set[str] = set()
        self.cache = ContextCache()  # the driver's own context (the dense baseline, config rows)
        self._ray = None

    def __enter__(self) -> "RayExecutor":
        ray = self._ray = import_ray()
        if ray.is_initialized():
            log.info("using the Ray instance this process already started")
        else:
            kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
                      **self.ray_init}
            try:
                if self.address is not None:
                    ray.init(address=self.address, **kwargs)
                else:
                    ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
                where = f"join the Ray cluster at {self.address}" if self.address else "start a local Ray instance"
                raise UserError(f"cannot {where} ({one_line(exc)})") from None
            self.started = True
        try:
            self._check_resources()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.cache.clear()
        if self.started and self._ray is not None:
            self._ray.shutdown()
            self.started = False
        return False

    def _check_resources(self) -> None:
        """A point must fit on one node, or its task would wait forever."""
        nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        if not any(r.get("CPU", 0) >= self.num_cpus_per_task and r.get("GPU", 0) >= self.num_gpus_per_task
                   for r in nodes):
            biggest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
            raise UserError(f"no node of the Ray cluster has {self.num_cpus_per_task:g} CPU and "
                            f"{self.num_gpus_per_task:g} GPU for one point (the largest has {biggest.get('CPU', 0):g} "
                            f"CPU, {biggest.get('GPU', 0):g} GPU); lower --num-cpus-per-task / --num-gpus-per-task")

    def info(self) -> dict:
        return {"kind": self.kind, "address": self.address, "num_cpus_per_task": self.num_cpus_per_task,
                "num_gpus_per_task": self.num_gpus_per_task, "workers": len(self.workers)}

    def run(self, fn: PointFn, spec: dict, points: Sequence[tuple[int, dict]]) -> Iterator[Outcome]:
        ray = self._ray
        if ray is None:
            raise RuntimeError("enter the RayExecutor (with ...) before running points")
        # max_calls=0: a worker keeps running points (and its cached model), also for GPU tasks
        task = ray.remote(num_cpus=self.num_cpus_per_task, num_gpus=self.num_gpus_per_task, max_calls=0,
                          max_retries=1)(_task)
        threads = max(1, int(self.num_cpus_per_task))
        spec_ref = ray.put(spec)
        pending = {task.remote(fn, spec_ref, point, threads): index for index, point in points}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_SLICE_S)
                for ref in ready:
                    index = pending.pop(ref)
                    try:
                        got = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the worker died (OOM, node lost...)
                        yield Outcome(index, error=one_line(getattr(exc, "cause", None) or exc), detail=str(exc))
                        continue
                    if got.get("worker"):
                        self.workers.add(got["worker"])
                    yield Outcome(index, got.get("value"), got.get("error"), got.get("worker"), got.get("detail"))
        finally:
            for ref in pending:  # the driver stops early (Ctrl-C, an error): drop what has not run
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001
                    pass
