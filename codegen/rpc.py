"""Distributed tuning on TVM's RPC tracker: measure candidates on every machine you have.

TVM's own machinery, no new protocol: a **tracker** (one per cluster) hands out **RPC servers**
registered under a key; MetaSchedule's ``RPCRunner`` asks the tracker for a free server per
candidate, uploads the compiled module (a tar of object files; the server links it with its C++
compiler), runs it there and reports the time. Candidates are compiled on the tuning machine
(``tune``'s in-process builder, exporting tars), so servers need TVM and a C++ compiler only.

On the machines (or from Python, see ``LocalCluster``)::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190                      # once
    python -m tvm.exec.rpc_server --tracker HOST:9190 --key fxpress                # per machine

Then tune with them::

    from fxpress.codegen import tune
    from fxpress.codegen.rpc import rpc_runner
    built = tune(mod, "llvm", trials=64, runner=rpc_runner("HOST", 9190, key="fxpress"))
    # or fxpress.compile(..., tune=64, options={"tune": {"runner": rpc_runner(...)}})

Every server under one key must be the same kind of machine as the target (records are keyed
by target; a faster server would make a schedule look better than it is on yours).
The servers' ``TVM_NUM_THREADS`` decides how many cores a measurement uses.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

DEFAULT_KEY = "fxpress"


def start_tracker(host: str = "127.0.0.1", port: int = 9190, port_end: int = 9290):
    """An RPC tracker in a child process (``tvm.rpc.tracker.Tracker``); ``.port``, ``.terminate()``."""
    from tvm.rpc.tracker import Tracker

    return Tracker(host=host, port=port, port_end=port_end, silent=True)


def start_server(tracker_host: str, tracker_port: int, key: str = DEFAULT_KEY, host: str = "127.0.0.1",
                 port: int = 9090, port_end: int = 9190):
    """An RPC server in a child process, registered with the tracker under ``key``."""
    from tvm.rpc.server import Server

    return Server(host=host, port=port, port_end=port_end, key=key, silent=True,
                  tracker_addr=(tracker_host, int(tracker_port)))


def connected_servers(tracker_host: str, tracker_port: int, key: str = DEFAULT_KEY) -> int:
    """How many servers are registered with the tracker under ``key`` (free or busy)."""
    from tvm import rpc

    summary = rpc.connect_tracker(tracker_host, int(tracker_port)).summary()
    return sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{key}")


def wait_for_servers(tracker_host: str, tracker_port: int, count: int, key: str = DEFAULT_KEY,
                     timeout_s: float = 120.0) -> int:
    """Block until ``count`` servers are registered under ``key`` (TimeoutError otherwise)."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        try:
            seen = connected_servers(tracker_host, tracker_port, key)
        except (OSError, RuntimeError):
            seen = 0
        if seen >= count:
            return seen
        time.sleep(0.5)
    raise TimeoutError(f"only {seen} of {count} RPC servers registered with the tracker at "
                       f"{tracker_host}:{tracker_port} under key {key!r} after {timeout_s:.0f} s")


def rpc_runner(tracker_host: str, tracker_port: int, key: str = DEFAULT_KEY, *, max_workers: int | None = None,
               session_timeout_sec: int = 60, number: int = 3, repeat: int = 3, min_repeat_ms: int = 10):
    """A MetaSchedule ``RPCRunner`` measuring on the tracker's servers under ``key``.

    ``max_workers``: candidates measured at once (default: the servers registered now).
    """
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

    if max_workers is None:
        try:
            max_workers = max(1, connected_servers(tracker_host, tracker_port, key))
        except (OSError, RuntimeError):
            max_workers = 1
    return RPCRunner(rpc_config=RPCConfig(tracker_host=tracker_host, tracker_port=int(tracker_port),
                                          tracker_key=key, session_timeout_sec=session_timeout_sec),
                     evaluator_config=EvaluatorConfig(number=number, repeat=repeat,
                                                      min_repeat_ms=min_repeat_ms,
                                                      enable_cpu_cache_flush=False),
                     max_workers=max_workers)


@dataclass
class LocalCluster:
    """A tracker and ``servers`` RPC servers on this machine (tests, demos, a multi-GPU box).

    ``with LocalCluster(servers=2) as c: tune(..., runner=c.runner())``
    """

    servers: int = 2
    key: str = DEFAULT_KEY
    host: str = "127.0.0.1"
    timeout_s: float = 120.0
    tracker: object = None
    server_procs: list = field(default_factory=list)

    def __enter__(self) -> "LocalCluster":
        self.tracker = start_tracker(self.host)
        # One measuring thread per server: N servers on one machine must not oversubscribe it.
        saved = os.environ.get("TVM_NUM_THREADS")
        os.environ["TVM_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, self.servers)))
        try:
            for _ in range(self.servers):
                self.server_procs.append(start_server(self.host, self.tracker.port, self.key, self.host))
            wait_for_servers(self.host, self.tracker.port, self.servers, self.key, self.timeout_s)
        except BaseException:
            self.close()
            raise
        finally:
            if saved is None:
                os.environ.pop("TVM_NUM_THREADS", None)
            else:
                os.environ["TVM_NUM_THREADS"] = saved
        return self

    @property
    def port(self) -> int:
        return int(self.tracker.port)

    def runner(self, **kwargs):
        kwargs.setdefault("max_workers", self.servers)
        return rpc_runner(self.host, self.port, self.key, **kwargs)

    def close(self) -> None:
        for server in self.server_procs:
            try:
                server.terminate()
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.server_procs.clear()
        if self.tracker is not None:
            try:
                self.tracker.terminate()
            except Exception:  # noqa: BLE001
                pass
            self.tracker = None

    def __exit__(self, *exc) -> None:
        self.close()

