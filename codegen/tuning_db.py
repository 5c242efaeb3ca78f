"""Persistent MetaSchedule tuning database: one JSON file per (target, workload), atomic and
safe under concurrent compiles.

Layout (``root`` = ``$FXPRESS_CACHE_DIR/tuning``, else ``~/.cache/fxpress/tuning``)::

    root/<target key>/target.json           the target, as TVM writes it
    root/<target key>/<workload key>.json   {"workload": ..., "records": [...], "trials": n, ...}

The target key is readable plus a hash of the whole target (``llvm-znver3-2c-<hash>``,
``cuda-sm_90-<hash>``), so records tuned for one CPU or GPU are never applied to another. The
workload key is MetaSchedule's own structural hash of the normalized PrimFunc module, the key
``MetaScheduleApplyDatabase`` looks records up by.

Writes: every change is read-merge-write of one workload file under an exclusive ``fcntl`` lock
(``<workload key>.lock``), written to a temporary file in the same directory, fsynced and
``os.replace``d over the old one. Readers never see a half-written file and never take the lock;
two processes tuning the same model merge their records instead of overwriting each other (the
best ``KEEP`` distinct traces per workload are kept). A corrupt or unreadable file is skipped
with a warning and overwritten by the next commit.

``TuningDatabase.ms_database()`` gives a MetaSchedule ``Database`` (an in-memory copy of the
files for this target that writes every valid new record through to disk); entering it as a
context (``with db.ms_database():``) makes fxpress's build apply the records (see
``apply_database``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time

import tvm

log = logging.getLogger("fxpress.codegen.tuning")

KEEP = 8  # distinct best traces kept per workload
FORMAT = 1
RECORDS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records")


def use_shipped() -> bool:
    """``FXPRESS_SHIPPED_RECORDS=0`` ignores codegen/records (tests that count database entries)."""
    return os.environ.get("FXPRESS_SHIPPED_RECORDS", "1") != "0"


def default_root() -> str:
    base = os.environ.get("FXPRESS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fxpress")
    return os.path.join(base, "tuning")


def target_key(target: tvm.target.Target) -> str:
    """``llvm-znver3-2c-1a2b3c4d5e`` / ``cuda-sm_90-...``: readable part + hash of the whole target."""
    text = json.dumps(_target_json(target), sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    kind = target.kind.name
    if kind == "llvm":
        name = f"llvm-{target.attrs.get('mcpu', 'generic')}-{int(target.attrs.get('num-cores', 0))}c"
    elif kind == "cuda":
        name = f"cuda-{target.attrs.get('arch', 'sm')}"
    else:
        name = kind
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-{digest}")


def _target_json(target: tvm.target.Target):
    return json.loads(json.dumps(target.export(), sort_keys=True, default=str))


def workload_key(workload) -> str:
    """Hex of MetaSchedule's structural hash of a ``Workload`` (or its JSON form)."""
    shash = workload[0] if isinstance(workload, (list, tuple)) else workload.as_json()[0]
    return f"{int(shash):016x}" if str(shash).lstrip("-").isdigit() else str(shash)


def _mean(run_secs) -> float:
    vals = [float(v) for v in (run_secs or [])]
    return sum(vals) / len(vals) if vals else float("inf")


def _run_secs_of(record_json) -> list[float]:
    # TuningRecord.as_json(): [trace, run_secs, target, args_info]
    try:
        return [float(v) for v in (record_json[1] or [])]
    except (TypeError, ValueError, IndexError):
        return []


def _valid(run_secs) -> bool:
    # MetaSchedule stores 1e10 (MAX_FLOAT-ish) for failed builds/runs.
    return bool(run_secs) and all(0 < s < 1e9 for s in run_secs)


def _atomic_write_json(path: str, data) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: str):
    with open(path + ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("tuning database: ignoring unreadable %s (%s)", path, err)
        return None


class TuningDatabase:
    """The on-disk records of one target (see module docstring)."""

    def __init__(self, target: tvm.target.Target, root: str | os.PathLike | None = None,
                 shipped: bool = True):
        self.target = target
        self.root = os.fspath(root) if root is not None else default_root()
        self.dir = os.path.join(self.root, target_key(target))
        self.shipped_dir = os.path.join(RECORDS_DIR, target_key(target)) if shipped and use_shipped() else None
        os.makedirs(self.dir, exist_ok=True)
        meta = os.path.join(self.dir, "target.json")
        if not os.path.exists(meta):
            _atomic_write_json(meta, {"target": _target_json(target), "format": FORMAT})

    # ----------------------------------------------------------------- files
    def _path(self, key: str) -> str:
        return os.path.join(self.dir, f"{key}.json")

    def entries(self) -> dict[str, dict]:
        """Workload key → file content, shipped records first, the user's own files winning."""
        out: dict[str, dict] = {}
        for directory in (self.shipped_dir, self.dir):
            if not directory or not os.path.isdir(directory):
                continue
            for name in sorted(os.listdir(directory)):
                if not name.endswith(".json") or name == "target.json" or name.startswith(".tmp-"):
                    continue
                path = os.path.join(directory, name)
                data = _valid_entry(_read_json(path), path)
                if data is None:
                    continue
                key = name[:-5]
                if key in out:
                    data = _merge(out[key], data)
                out[key] = data
        return out

    def trials(self, workload) -> int:
        """How many trials have been measured for this workload (0 if never tuned)."""
        entry = self.entries().get(workload_key(workload))
        return entry["trials"] if entry else 0

    def commit(self, workload_json, records_json: list, trials: int = 0, name: str = "",
               default_secs: float | None = None) -> dict:
        """Merge records (``TuningRecord.as_json()``), a trial count and the default schedule's
        run time (same runner; records slower than it are not applied) into the workload's file."""
        key = workload_key(workload_json)
        path = self._path(key)
        new = {"format": FORMAT, "workload": workload_json, "records": list(records_json),
               "trials": int(trials), "names": [name] if name else [], "updated": time.time()}
        if default_secs is not None:
            new["default_secs"] = float(default_secs)
        with _locked(path):
            old = _valid_entry(_read_json(path), path)  # a bad file is overwritten, not merged
            merged = _merge(old, new)
            _atomic_write_json(path, merged)
        return merged

    # ----------------------------------------------------------------- MetaSchedule
    def ms_database(self):
        """A MetaSchedule Database holding this target's records; new records are written through."""
        return _make_ms_database(self)

    def best(self) -> dict[str, float]:
        """Workload key → best mean run time in seconds (for reports)."""
        return {k: min((_mean(_run_secs_of(r)) for r in e.get("records", [])), default=float("inf"))
                for k, e in self.entries().items()}


def _is_record(rec) -> bool:
    """A ``TuningRecord.as_json()``: [trace, run_secs (list of numbers or null), target, args_info, ...]."""
    if not isinstance(rec, list) or len(rec) < 2 or rec[0] is None:
        return False
    secs = rec[1]
    return secs is None or (isinstance(secs, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in secs))


def _valid_entry(data, path: str) -> dict | None:
    """``data`` (a parsed workload file) if it has the structure this module writes, else None with a
    warning: the file is skipped (and replaced by the next commit), never allowed to break a build.
    Records of the wrong shape inside an otherwise good file are dropped one by one."""
    if data is None:
        return None

    def bad(why: str) -> None:
        log.warning("tuning database: ignoring %s (%s); the next tuning run of this workload rewrites it", path, why)

    if not isinstance(data, dict):
        return bad(f"a JSON {type(data).__name__}, not an object")
    if not isinstance(data.get("workload"), list) or not data["workload"]:
        return bad("no 'workload' list")
    records = data.get("records", [])
    if not isinstance(records, list):
        return bad("'records' is not a list")
    numbers = {k: data.get(k, 0) for k in ("trials", "updated")}
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers.values()):
        return bad("'trials' or 'updated' is not a number")
    default = data.get("default_secs")
    if default is not None and (isinstance(default, bool) or not isinstance(default, (int, float))):
        return bad("'default_secs' is not a number")
    names = data.get("names", [])
    good = [r for r in records if _is_record(r)]
    if len(good) < len(records):
        log.warning("tuning database: dropping %d malformed record(s) in %s", len(records) - len(good), path)
    clean = {**data, "records": good, "trials": int(numbers["trials"]), "updated": float(numbers["updated"]),
             "names": [n for n in names if isinstance(n, str)] if isinstance(names, list) else []}
    return clean


def _merge(old: dict | None, new: dict) -> dict:
    """Union of records (distinct traces, the faster measurement wins), best KEEP valid ones."""
    by_trace: dict[str, list] = {}
    for rec in (old or {}).get("records", []) + new.get("records", []):
        if not _valid(_run_secs_of(rec)):
            continue
        key = json.dumps(rec[0], sort_keys=True)
        if key not in by_trace or _mean(_run_secs_of(rec)) < _mean(_run_secs_of(by_trace[key])):
            by_trace[key] = rec
    records = sorted(by_trace.values(), key=lambda r: _mean(_run_secs_of(r)))[:KEEP]
    names = list(dict.fromkeys((old or {}).get("names", []) + new.get("names", [])))
    merged = {"format": FORMAT, "workload": (old or new)["workload"], "records": records,
              "trials": int((old or {}).get("trials", 0)) + int(new.get("trials", 0)),
              "names": names[:16], "updated": max(float((old or {}).get("updated", 0)),
                                                  float(new.get("updated", 0)))}
    default = new.get("default_secs", (old or {}).get("default_secs"))
    if default is not None:
        merged["default_secs"] = float(default)
    return merged


def prefers_default(entry: dict) -> bool:
    """True when the default schedule measured faster than every record of this workload."""
    default = entry.get("default_secs")
    best = min((_mean(_run_secs_of(r)) for r in entry.get("records", [])), default=float("inf"))
    return default is not None and default <= best


def _make_ms_database(db: TuningDatabase):
    from tvm.s_tir.meta_schedule.database import (MemoryDatabase, PyDatabase, TuningRecord, Workload)
    from tvm.ir.utils import derived_object

    memory = MemoryDatabase(module_equality="structural")
    for key, entry in db.entries().items():
        if prefers_default(entry):
            continue  # keep the default schedule: no record here beat it
        try:
            workload = memory.commit_workload(Workload.from_json(entry["workload"]).mod)
            for rec in entry.get("records", []):
                memory.commit_tuning_record(TuningRecord.from_json(rec, workload))
        except Exception as err:  # noqa: BLE001 - a stale record (other TVM version) must not break a build
            log.warning("tuning database: skipping workload %s (%s)", key, str(err).splitlines()[0])

    @derived_object
    class _WriteThrough(PyDatabase):
        """MemoryDatabase for lookups; each valid new record is also merged into its file."""

        def __init__(self):
            super().__init__()
            self.memory = memory
            self.disk = db

        def has_workload(self, mod):
            return self.memory.has_workload(mod)

        def commit_workload(self, mod):
            return self.memory.commit_workload(mod)

        def commit_tuning_record(self, record):
            self.memory.commit_tuning_record(record)
            rec = record.as_json()
            if _valid(_run_secs_of(rec)):
                self.disk.commit(record.workload.as_json(), [rec])

        def get_top_k(self, workload, top_k):
            return self.memory.get_top_k(workload, top_k)

        def get_all_tuning_records(self):
            return self.memory.get_all_tuning_records()

        def query_tuning_record(self, mod, target, workload_name=None):
            return self.memory.query_tuning_record(mod, target, workload_name)

        def query_schedule(self, mod, target, workload_name=None):
            return self.memory.query_schedule(mod, target, workload_name)

        def query_ir_module(self, mod, target, workload_name=None):
            return self.memory.query_ir_module(mod, target, workload_name)

        def __len__(self):
            return len(self.memory)

    return _WriteThrough()


def apply_database(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Replace every PrimFunc that has a record by its tuned schedule (marked
    ``tirx.is_scheduled``, so default schedules leave it alone).

    The database is the MetaSchedule database in scope (``with database:``, what ``tune()``
    does); without one, the default on-disk database of ``target`` (the user's cache and the
    shipped records), so a plain ``build()`` also reuses earlier tuning. ``FXPRESS_TUNING_CACHE=0``
    turns that off.
    """
    from tvm import relax
    from tvm.s_tir.meta_schedule.database import Database

    if Database.current() is not None:
        with target:
            return relax.transform.MetaScheduleApplyDatabase()(mod)
    if os.environ.get("FXPRESS_TUNING_CACHE", "1") == "0" or not _has_records(target):
        return mod
    try:
        database = TuningDatabase(target).ms_database()
    except OSError as err:  # unwritable cache dir: build without records
        log.warning("tuning database unavailable (%s); default schedules only", err)
        return mod
    with target, database:
        return relax.transform.MetaScheduleApplyDatabase()(mod)


def _has_records(target: tvm.target.Target) -> bool:
    key = target_key(target)
    dirs = [os.path.join(default_root(), key)] + ([os.path.join(RECORDS_DIR, key)] if use_shipped() else [])
    for directory in dirs:
        try:
            if any(n.endswith(".json") and n != "target.json" for n in os.listdir(directory)):
                return True
        except OSError:
            continue
    return False
