"""A real multi-node Ray cluster on one machine, for tests: `ray start --head` plus `ray start --address` worker
nodes, each its own `--block` process group on its own ports, with logical resources (`--num-gpus` needs no GPU).

Nodes are stopped by killing their process groups, never with `ray stop` (that would kill every Ray of the user,
including the test session's own cluster).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
_READY = "Ray runtime started"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the node's process group, SIGKILL what is left after `grace_s` (gcs_server ignores SIGTERM)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not _group_alive(proc.pid):
            break
        os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_alive(proc.pid):
            proc.poll()
            time.sleep(0.2)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class RayNodes:
    """`head()` first, then `add(num_gpus=..., num_cpus=...)` while jobs run; `stop()` ends them all."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: socket paths have a length limit
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                        PATH=f"{VENV_BIN}{os.pathsep}{self.env['PATH']}")
        self.procs: list[subprocess.Popen] = []
        self.gcs_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _start(self, args: list[str], name: str, timeout: float) -> subprocess.Popen:
        """Start a node; once more on fresh ports if the first try fails (a port taken between probe and bind)."""
        try:
            return self._start_once(args, name, timeout)
        except RuntimeError as first:
            try:
                return self._start_once(args, name + "-retry", timeout)
            except RuntimeError as second:
                raise second from first

    def _start_once(self, args: list[str], name: str, timeout: float) -> subprocess.Popen:
        ports = {k: free_port() for k in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                           "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                           "runtime-env-agent-port")}
        lo = random.randrange(20000, 29000, 100)  # worker ports below the ephemeral range the ports come from
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               f"--object-store-memory={80 * 1024 * 1024}", f"--min-worker-port={lo}", f"--max-worker-port={lo + 99}",
               *args, *(f"--{k}={v}" for k, v in ports.items())]
        log_path = Path(self.temp_dir) / f"{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while _READY not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_group(proc)
                self.procs.remove(proc)
                raise RuntimeError(f"ray start ({name}) did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        return proc

    def head(self, num_cpus: float, num_gpus: int = 0, timeout: float = 150.0) -> "RayNodes":
        for attempt in range(2):  # fresh ports on the second try (one may be taken between probe and bind)
            self.gcs_port = free_port()
            try:
                self._start_once(["--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
                                  "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                                  f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"], f"head{attempt}", timeout)
                return self
            except RuntimeError:
                if attempt:
                    raise
        return self

    def add(self, num_cpus: float, num_gpus: int = 0, timeout: float = 150.0) -> subprocess.Popen:
        assert self.gcs_port is not None, "start the head first"
        return self._start([f"--address={self.address}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"],
                           f"node{len(self.procs)}", timeout)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first, the head last
            stop_group(proc)
        self.procs.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
