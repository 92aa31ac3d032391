"""Fixtures for the batch pipeline tests: one local Ray cluster per session, a moto S3 server (a subprocess on a
free 127.0.0.1 port) behind a TCP proxy that tests can stop to simulate an outage, and small prompt files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Credentials for moto; set before Ray starts so that workers inherit them too.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

VENV_BIN = Path(sys.executable).parent
ENGINE_ACTOR_TITLE = "ray::MapWorker(MapBatches(EngineReplica))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class TcpProxy:
    """A loopback TCP proxy: `stop()` refuses new connections and cuts open ones (the store "goes away"),
    `start()` brings it back on the same port, with the store's contents intact behind it."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is not None:
            srv.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture(scope="session")
def moto_s3():
    """(proxy, direct endpoint URL): jobs talk to `proxy` (endpoint `http://127.0.0.1:<proxy.port>`); tests inspect
    the store directly through the second URL, which keeps working while the proxy is stopped."""
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        proxy = TcpProxy(port)
        proxy.start()
        yield proxy, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def s3_endpoint(moto_s3) -> str:
    proxy, _ = moto_s3
    return f"http://127.0.0.1:{proxy.port}"


def s3fs_client(endpoint: str):
    import s3fs

    # No region here: an explicit us-east-1 makes bucket creation send a LocationConstraint moto rejects.
    return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, use_listings_cache=False,
                             skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3(moto_s3):
    """An s3fs client that talks to moto directly (not through the proxy)."""
    return s3fs_client(moto_s3[1])


_bucket_counter = iter(range(10**6))


@pytest.fixture
def bucket(s3) -> str:
    name = f"test-{os.getpid()}-{next(_bucket_counter)}"
    s3.mkdir(name)
    return name


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (4 logical CPUs on the 2-core machine: the engine actors
    take fractional CPUs so read/tokenize/write tasks always find room)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    # Left running for other test modules of the session; Ray shuts it down at exit.


@pytest.fixture(scope="session")
def model_dir(tiny_checkpoint) -> Path:
    return Path(tiny_checkpoint)


def write_prompts(path, rows: dict[str, list], row_group_size: int | None = None, fs=None) -> None:
    table = pa.table(rows)
    if fs is None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=row_group_size)
    else:
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, row_group_size=row_group_size)


def raylet_children_with_title(prefix: str) -> list[int]:
    """PIDs of this session's Ray worker processes (children of our raylet) whose title starts with `prefix`;
    other people's Ray processes on the machine are never touched."""
    import ray

    node = ray._private.worker._global_node
    raylet_pid = node.all_processes["raylet"][0].process.pid
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != raylet_pid:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith(prefix):
            pids.append(int(d))
    return pids


def engine_actor_pids() -> list[int]:
    """PIDs of this session's engine replica actors."""
    return raylet_children_with_title(ENGINE_ACTOR_TITLE)


TP_RANK_ACTOR_TITLE = "ray::_TPRankActor"


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class JobWatch:
    """What a fault test needs to prove that its fault landed, for `run_batch` calls made in this process.

    * The job's progress tracker (captured from `pipeline.batch` when the job starts; `pipeline/` is not changed):
      every replica's latest engine stats, keyed "node:pid" as in the manifest's
      `prefix_cache.replica_engine_stats` (`num_streams` = rows in flight, `num_steps` = engine steps so far).
    * The pids of this session's engine replica and tensor-parallel rank actors over time, sampled on a thread, so
      a replacement that starts and ends between two looks of the test is still seen.

        with JobWatch() as watch:
            job = start run_batch in a thread
            busy = watch.wait_busy(pid, timeout)   # the replica is stepping with rows in flight
            os.kill(pid, SIGKILL)
    """

    KINDS = {"replica": ENGINE_ACTOR_TITLE, "tp_rank": TP_RANK_ACTOR_TITLE}

    def __init__(self, interval_s: float = 0.25):
        self.trackers: list = []
        self.first_seen: dict[str, dict[int, float]] = {k: {} for k in self.KINDS}
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="job-watch", daemon=True)
        self._saved = None
        self.since = 0.0

    def __enter__(self) -> "JobWatch":
        import pipeline.batch as batch

        trackers, original = self.trackers, batch.ProgressPrinter

        class _Capturing(original):
            def __init__(self, tracker, *args, **kwargs):
                trackers.append(tracker)
                super().__init__(tracker, *args, **kwargs)

        self._saved = original
        batch.ProgressPrinter = _Capturing
        self._sample_once()  # processes of earlier jobs (still exiting) are seen now, and never counted as ours
        self.since = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import pipeline.batch as batch

        batch.ProgressPrinter = self._saved
        self._stop.set()
        self._thread.join(5)

    def _sample_once(self) -> None:
        now = time.time()
        for kind, title in self.KINDS.items():
            for pid in raylet_children_with_title(title):
                self.first_seen[kind].setdefault(pid, now)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._sample_once()
            except Exception:  # noqa: BLE001 - Ray shutting down; the test's own checks report what is missing
                pass

    def pids(self, kind: str, since: float | None = None) -> list[int]:
        """Pids of `kind` ("replica" | "tp_rank") first seen at or after `since` (default: since the watch started),
        oldest first."""
        self._sample_once()
        since = self.since if since is None else since
        return [p for p, t in sorted(self.first_seen[kind].items(), key=lambda kv: kv[1]) if t >= since]

    def live(self, kind: str) -> list[int]:
        """Live pids of `kind` that started while watching (the watched jobs' own processes)."""
        ours = set(self.pids(kind))
        return [p for p in raylet_children_with_title(self.KINDS[kind]) if p in ours]

    def replica_stats(self) -> dict[str, dict]:
        """The current job's latest engine stats per replica ({} before its tracker exists or after it ended)."""
        import ray

        if not self.trackers:
            return {}
        try:
            return ray.get(self.trackers[-1].snapshot.remote(), timeout=10).get("replicas", {})
        except Exception:  # noqa: BLE001 - the job ended and its tracker with it
            return {}

    @staticmethod
    def stats_of(stats: dict[str, dict], pid: int) -> dict | None:
        return next((v for k, v in stats.items() if k.rsplit(":", 1)[-1] == str(pid)), None)

    def wait_busy(self, pid: int, timeout: float, alive=None) -> dict:
        """Wait until replica `pid` reports rows in flight (`num_streams` > 0) in two reports between which its
        engine stepped (`num_steps` grew): it is working on rows right now. Returns the last of those stats."""
        deadline = time.time() + timeout
        first = None
        while time.time() < deadline:
            if alive is not None and not alive():
                raise AssertionError(f"the job ended before replica {pid} was working on rows")
            st = self.stats_of(self.replica_stats(), pid)
            if st is not None and st.get("num_streams", 0) > 0:
                if first is None:
                    first = st
                elif st.get("num_steps", 0) > first.get("num_steps", 0):
                    return st
            else:
                first = None
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for replica {pid} to work on rows "
                             f"(last stats: {self.stats_of(self.replica_stats(), pid)})")


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while pid_alive(pid):
        if time.time() > deadline:
            raise AssertionError(f"process {pid} still alive {timeout}s after SIGKILL")
        time.sleep(0.1)
