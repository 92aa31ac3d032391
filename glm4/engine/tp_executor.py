"""Tensor-parallel executors: rank 0 in the engine's process plus the supervision of its worker ranks, the rank
protocol they share, and the local-process launcher (`MultiprocExecutor`). `pipeline/tp_ray.py` subclasses
`TPExecutorBase` to run the same worker side (`serve_rank`) inside Ray actors. Process groups and collectives
are glm4/distributed.py's.

Protocol:
  * every rank joins one group with `init_tp_group` (NCCL on CUDA, gloo on CPU; step inputs always travel over a
    gloo group on CPU tensors), loads only its shard (`ModelRunner(..., tp_rank, tp_size, tp_group)`), and takes
    part in `sync_num_blocks` (each rank sizes the KV cache from its own free memory; the group takes the minimum,
    so every rank allocates the same cache);
  * rank 0 lives in the engine's process. Per step it broadcasts the packed `StepInputs` (a fixed-size int64
    header, then one int64 body: no pickling) and runs its own forward; the collectives inside the layers keep the
    ranks in lockstep. Worker ranks run `worker_loop`: receive header (STEP or SHUTDOWN), receive body, run, repeat.

Failure model: a dead rank makes the peers' gloo operations fail at once ("connection closed by peer"); a rank
that is alive but silent makes them fail after the group timeout (`ExecutorSpec.worker_timeout_s`). Rank 0 runs
its collectives on a dedicated thread while the calling thread watches the workers (process sentinels here, the
actor's long-running call in Ray), so `execute` raises `TensorParallelError` within that bound even when a
collective would block; the remaining workers are then killed and the group destroyed. Workers wait for the next
step without a deadline (an idle engine is fine) and exit when their parent process dies.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Any, Callable

import torch

from glm4.distributed import TPGroup, all_reduce_min, broadcast, destroy_tp_group, get_free_port, init_tp_group
from glm4.engine.executor import Executor, ExecutorSpec, TensorParallelError
from glm4.engine.model_runner import ModelRunner
from glm4.engine.step_inputs import HEADER_LEN, OP_SHUTDOWN, OP_STEP, StepInputs

logger = logging.getLogger(__name__)

__all__ = ["broadcast_step", "broadcast_shutdown", "sync_num_blocks", "worker_loop", "serve_rank", "rank_devices",
           "worker_num_threads", "TPExecutorBase", "MultiprocExecutor"]

# A worker waits this long for the next step's header: idle engines are normal, so this is "forever"; a dead
# rank 0 is noticed through the closed connection and the parent-death watchdog instead.
IDLE_TIMEOUT = timedelta(days=3650)
_POLL_S = 0.05  # how often the calling thread checks worker liveness while rank 0 is inside a step


# ---- the rank protocol ---------------------------------------------------------------------------------------------
def broadcast_step(inputs: StepInputs, tp: TPGroup) -> None:
    """Rank 0: send one step's inputs (header, then body) to every worker."""
    header, body = inputs.pack()
    broadcast(header, tp.control, tp.timeout)
    if body.numel():
        broadcast(body.contiguous(), tp.control, tp.timeout)


def broadcast_shutdown(tp: TPGroup) -> None:
    header = torch.zeros(HEADER_LEN, dtype=torch.long)
    header[0] = OP_SHUTDOWN
    broadcast(header, tp.control, tp.timeout)


def sync_num_blocks(runner: ModelRunner, tp: TPGroup, spec: ExecutorSpec) -> int:
    """Every rank sizes the KV cache from its own free memory; all allocate the group's minimum. The ranks call
    this at the same time, so a profile run's collectives (glm4/engine/memory_profile.py) meet."""
    n = runner.num_blocks_for_budget(spec.kv_cache_memory, spec.block_size, spec.max_blocks_needed,
                                     max_num_batched_tokens=spec.max_num_batched_tokens, max_num_seqs=spec.max_num_seqs)
    t = torch.tensor([n], dtype=torch.long)
    # Ranks finish loading their shards at different times: allow the start-up bound, not the step bound.
    all_reduce_min(t, tp.control, timedelta(seconds=float(spec.startup_timeout_s)))
    return int(t.item())


def worker_loop(runner: ModelRunner, tp: TPGroup) -> int:
    """Worker ranks: run every step rank 0 broadcasts until SHUTDOWN. Returns the number of steps run."""
    header = torch.empty(HEADER_LEN, dtype=torch.long)
    steps = 0
    while True:
        broadcast(header, tp.control, IDLE_TIMEOUT)
        op = int(header[0])
        if op == OP_SHUTDOWN:
            return steps
        if op != OP_STEP:
            raise RuntimeError(f"rank {tp.rank}: unknown op {op} in step header {header.tolist()}")
        body = torch.empty(StepInputs.body_numel(header), dtype=torch.long)
        if body.numel():
            broadcast(body, tp.control, tp.timeout)
        runner.run(StepInputs.unpack(header, body))
        steps += 1


def rank_devices(spec: ExecutorSpec) -> list[str]:
    """Device of each rank for local launchers: rank r on cuda:(base + r) on GPU machines, all on the CPU else."""
    dev = torch.device(spec.device) if spec.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tp = spec.tensor_parallel_size
    if dev.type != "cuda":
        return [str(dev)] * tp
    base = dev.index or 0
    if torch.cuda.device_count() < base + tp:
        raise ValueError(f"tensor_parallel_size={tp} from {dev} needs {base + tp} CUDA devices, "
                         f"found {torch.cuda.device_count()}")
    return [f"cuda:{base + r}" for r in range(tp)]


def worker_num_threads(tp_size: int) -> int:
    """CPU threads for a worker rank: the cores this process may use, shared by the ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, tp_size))


def serve_rank(spec: ExecutorSpec, rank: int, master_addr: str, master_port: int, device: str) -> int:
    """Everything a worker rank does: join the group, load its shard, size and allocate the KV cache, serve
    steps until SHUTDOWN, leave the group. Returns the number of steps run."""
    tp = init_tp_group(rank, spec.tensor_parallel_size, master_addr, master_port, timeout=spec.worker_timeout_s,
                       device=device, rendezvous_timeout=spec.startup_timeout_s)
    try:
        runner = ModelRunner(spec.model_dir, dtype=spec.dtype, device=device, tp_rank=rank,
                             tp_size=spec.tensor_parallel_size, tp_group=tp.group,
                             load_format=spec.load_format)
        num_blocks = sync_num_blocks(runner, tp, spec)
        runner.allocate_kv_cache(num_blocks, spec.block_size, max_num_seqs=spec.max_num_seqs,
                                 max_model_len=spec.max_model_len)
        runner.capture_decode_graphs(spec.cuda_graph_max_batch)  # every rank, in step with rank 0
        return worker_loop(runner, tp)
    finally:
        destroy_tp_group(tp)


# ---- rank 0 and the executor skeleton shared by the launchers -------------------------------------------------
class TPExecutorBase(Executor):
    """Rank 0 of a tensor-parallel group plus the supervision of its workers. Launchers implement the hooks
    `_launch_workers`, `_dead_workers`, `_join_workers`, `_kill_workers` and `_reap_workers`."""

    def __init__(self, spec: ExecutorSpec) -> None:
        if spec.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {spec.tensor_parallel_size}")
        self.spec = spec
        self.tp_size = spec.tensor_parallel_size
        self.worker_timeout_s = float(spec.worker_timeout_s)
        self.tp: TPGroup | None = None
        self._failure: str | None = None
        self._closed = False
        self._stopping = False  # set once SHUTDOWN was sent: workers exiting is expected from then on
        self._abort_startup = threading.Event()
        self._lock = threading.RLock()
        self._last_check = 0.0
        self.rank0_device = self._rank0_device()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm4-tp-rank0",
                                        initializer=self._init_rank0_thread)
        port = spec.master_port or get_free_port(spec.master_addr if spec.master_addr != "localhost"
                                                  else "127.0.0.1")
        t0 = time.monotonic()
        try:
            self.master_addr = self._launch_workers(port)
            self.master_port = port
            fut = self._pool.submit(self._start_rank0)
            self._wait(fut, deadline=t0 + float(spec.startup_timeout_s), what="start-up")
        except BaseException as e:
            self._abort_startup.set()
            msg = self._describe(e)
            self._teardown_after_failure()
            if isinstance(e, TensorParallelError):
                raise
            if isinstance(e, Exception):
                raise TensorParallelError(f"tensor-parallel group (tp={self.tp_size}) failed to start: {msg}") from e
            raise
        logger.info("tensor-parallel group up: tp=%d via %s:%d (%s), %d KV blocks, %.1f s", self.tp_size,
                    self.master_addr, port, self.tp.backend if self.tp else "?", self.num_blocks,
                    time.monotonic() - t0)

    # ---- hooks ---------------------------------------------------------------------------------------------
    def _launch_workers(self, master_port: int) -> str:
        """Start ranks 1..tp-1 (they call `serve_rank`); return the rendezvous address rank 0 hosts."""
        raise NotImplementedError

    def _dead_workers(self) -> list[str]:
        """Descriptions of workers that are gone (empty when all are alive)."""
        raise NotImplementedError

    def _join_workers(self, timeout: float) -> bool:
        """Wait for the workers to exit after SHUTDOWN; True if all did."""
        raise NotImplementedError

    def _kill_workers(self) -> None:
        raise NotImplementedError

    def _reap_workers(self, timeout: float) -> None:
        """After `_kill_workers`: wait until the worker processes are really gone; release launcher resources."""
        raise NotImplementedError

    def _rank0_device(self) -> str:
        return rank_devices(self.spec)[0]

    @property
    def worker_pids(self) -> list[int]:
        return []

    # ---- rank 0 thread ---------------------------------------------------------------------------------------
    def _init_rank0_thread(self) -> None:
        if self.rank0_device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.rank0_device))

    def _start_rank0(self) -> None:
        spec = self.spec
        self.tp = init_tp_group(0, self.tp_size, self.master_addr, self.master_port, timeout=spec.worker_timeout_s,
                                device=self.rank0_device, rendezvous_timeout=spec.startup_timeout_s,
                                should_abort=self._abort_startup.is_set)
        runner = ModelRunner(spec.model_dir, dtype=spec.dtype, device=self.rank0_device, tp_rank=0,
                             tp_size=self.tp_size, tp_group=self.tp.group,
                             load_format=spec.load_format)
        self.num_blocks = sync_num_blocks(runner, self.tp, spec)
        runner.allocate_kv_cache(self.num_blocks, spec.block_size, max_num_seqs=spec.max_num_seqs,
                                 max_model_len=spec.max_model_len)
        runner.capture_decode_graphs(spec.cuda_graph_max_batch)
        self._adopt_runner(runner, spec)

    def _step_rank0(self, inputs: StepInputs) -> torch.Tensor:
        assert self.tp is not None
        broadcast_step(inputs, self.tp)
        logits = self.runner.run(inputs)
        if logits.is_cuda:  # surface a hung collective here, inside the watched thread, not in the sampler
            torch.cuda.current_stream(logits.device).synchronize()
        return logits

    # ---- supervision ---------------------------------------------------------------------------------------
    def _wait(self, fut: Future, deadline: float | None, what: str) -> Any:
        """Result of work on the rank-0 thread, raising as soon as a worker is found dead."""
        while True:
            try:
                return fut.result(timeout=_POLL_S)
            except FutureTimeout:
                pass
            dead = self._dead_workers()
            if dead:
                raise TensorParallelError(f"worker rank(s) died during {what}: " + "; ".join(dead))
            if deadline is not None and time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel {what} did not finish within "
                                          f"{self.spec.startup_timeout_s:.0f} s (startup_timeout_s)")

    def _describe(self, e: BaseException) -> str:
        """The error text, with what the workers reported when the first sign was a broken connection."""
        if isinstance(e, TensorParallelError):
            return str(e)
        lines = str(e).strip().splitlines()
        msg = f"{type(e).__name__}: {lines[0] if lines else ''}"
        dead = self._dead_workers_after(1.0)
        if dead:
            return f"{'; '.join(dead)} (rank 0 saw {msg})"
        if "timed out" in msg.lower():
            return (f"a worker rank stopped answering: no reply within worker_timeout_s={self.worker_timeout_s:g} s "
                    f"(rank 0 saw {msg})")
        return f"rank 0: {msg}"

    def _dead_workers_after(self, grace: float) -> list[str]:
        """Dead workers, giving a just-killed process a moment to be noticed (peer errors arrive first)."""
        end = time.monotonic() + grace
        while True:
            dead = self._dead_workers()
            if dead or time.monotonic() > end:
                return dead
            time.sleep(0.02)

    def _run_on_rank0_thread(self, fn: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
        try:
            return True, self._pool.submit(fn).result(timeout=timeout)
        except FutureTimeout:
            return False, None
        except RuntimeError as e:  # pool already shut down
            return False, e
        except Exception as e:  # noqa: BLE001
            return True, e

    def _teardown_after_failure(self) -> None:
        """Kill the workers, let rank 0's thread leave its collective (it fails once the peers are gone), destroy
        the group, and wait until the worker processes are gone."""
        self._stopping = True
        try:
            self._kill_workers()
        except Exception:  # noqa: BLE001
            logger.warning("killing tensor-parallel workers failed", exc_info=True)
        nccl = self.tp is not None and self.tp.backend == "nccl"
        # gloo: the killed peers make rank 0's pending operation fail at once. NCCL kernels wait forever on a dead
        # peer: abort the communicators quickly, before the NCCL watchdog's own timeout handling kicks in.
        drain_s = 2.0 if nccl else max(5.0, min(self.worker_timeout_s, 30.0))
        drained, _ = self._run_on_rank0_thread(lambda: None, timeout=drain_s)
        if drained:
            self._run_on_rank0_thread(lambda: destroy_tp_group(self.tp, abort=True), timeout=10.0)
        elif nccl:
            destroy_tp_group(self.tp, abort=True)  # aborting NCCL communicators unblocks the stuck thread
        else:
            logger.warning("rank 0 is still inside a collective; leaving its process group behind")
        try:
            self._reap_workers(timeout=10.0)
        except Exception:  # noqa: BLE001
            logger.warning("reaping tensor-parallel workers failed", exc_info=True)
        self._pool.shutdown(wait=False)
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.kv_caches = []

    def _fail(self, e: BaseException) -> TensorParallelError:
        """Record the failure, tear the group down, and return the error to raise."""
        if self._failure is None:
            self._failure = self._describe(e)
            logger.error("tensor-parallel group (tp=%d) failed: %s; shutting it down", self.tp_size, self._failure)
            self._teardown_after_failure()
        return TensorParallelError(f"tensor-parallel group (tp={self.tp_size}) failed and was shut down: "
                                   f"{self._failure}")

    def _ensure_usable(self) -> None:
        if self._failure is not None:
            raise TensorParallelError(f"tensor-parallel group (tp={self.tp_size}) failed earlier and was shut "
                                      f"down: {self._failure}")
        if self._closed:
            raise TensorParallelError("the tensor-parallel executor was shut down")

    # ---- Executor interface -----------------------------------------------------------------------------------
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        with self._lock:
            self._ensure_usable()
            now = time.monotonic()
            if now - self._last_check > self._check_interval():
                self._last_check = now
                dead = self._dead_workers()
                if dead:
                    raise self._fail(TensorParallelError("worker rank(s) died: " + "; ".join(dead)))
            fut = self._pool.submit(self._step_rank0, inputs)
            try:
                return self._wait(fut, deadline=None, what="a step")
            except Exception as e:  # a broken step leaves the ranks out of lockstep: the group is unusable
                raise self._fail(e) from e

    def _check_interval(self) -> float:
        """Minimum seconds between liveness checks before a step (each step already fails fast on a dead peer)."""
        return 0.0

    def check_health(self) -> None:
        with self._lock:
            self._ensure_usable()
            dead = self._dead_workers()
            if dead:
                raise self._fail(TensorParallelError("worker rank(s) died: " + "; ".join(dead)))

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._failure is not None:
                return  # already torn down
            self._stopping = True
            sent, err = self._run_on_rank0_thread(lambda: broadcast_shutdown(self.tp), timeout=self.worker_timeout_s)
            if sent and err is None:
                self._join_workers(timeout=min(self.worker_timeout_s, 10.0))
            self._kill_workers()  # stragglers (no-op for those that exited)
            self._run_on_rank0_thread(lambda: destroy_tp_group(self.tp), timeout=10.0)
            self._reap_workers(timeout=10.0)
            self._pool.shutdown(wait=False)
            runner = getattr(self, "runner", None)
            if runner is not None:
                runner.kv_caches = []

    def __del__(self) -> None:  # last resort: never leave workers behind
        try:
            if not self._closed and self._failure is None:
                self._kill_workers()
        except Exception:  # noqa: BLE001
            pass


# ---- local processes ---------------------------------------------------------------------------------------------
def _parent_watchdog(parent_pid: int) -> None:
    """Exit this worker as soon as the process that started it is gone."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    while True:
        if parent is not None:
            parent.join(timeout=0.5)  # waits on the parent's sentinel: returns at once when it dies
            if not parent.is_alive():
                break
        else:
            time.sleep(0.5)
        if os.getppid() != parent_pid:
            break
    os._exit(70)


def _worker_main(spec: ExecutorSpec, rank: int, master_addr: str, master_port: int, device: str,
                 num_threads: int, parent_pid: int, err_conn: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle; we exit with it
    threading.Thread(target=_parent_watchdog, args=(parent_pid,), daemon=True, name="glm4-tp-watchdog").start()
    torch.set_num_threads(num_threads)
    code = 0
    try:
        serve_rank(spec, rank, master_addr, master_port, device)
    except BaseException:
        code = 1
        try:
            err_conn.send(traceback.format_exc(limit=20))
        except Exception:  # noqa: BLE001
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)  # skip interpreter teardown (seconds with torch loaded); nothing else is left to flush


class MultiprocExecutor(TPExecutorBase):
    """Rank 0 in this process, ranks 1..tp-1 in spawned local processes (CUDA: rank r on cuda:base+r).

    Scripts that use it need the usual `if __name__ == "__main__":` guard (spawn re-imports the main module)."""

    def __init__(self, spec: ExecutorSpec) -> None:
        self._procs: list[Any] = []
        self._errs: list[Any] = []
        self._reported: dict[int, str] = {}
        super().__init__(spec)

    def _launch_workers(self, master_port: int) -> str:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        devices = rank_devices(self.spec)
        threads = worker_num_threads(self.tp_size)
        for rank in range(1, self.tp_size):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_main, name=f"glm4-tp-rank{rank}", daemon=True,
                            args=(self.spec, rank, self.spec.master_addr, master_port, devices[rank], threads,
                                  os.getpid(), send))
            p.start()
            send.close()
            self._procs.append(p)
            self._errs.append(recv)
        return self.spec.master_addr

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def worker_processes(self) -> list[Any]:
        return list(self._procs)

    def _error_text(self, i: int) -> str:
        if i not in self._reported:
            text = ""
            try:
                if self._errs[i].poll(0):
                    text = str(self._errs[i].recv())
            except (EOFError, OSError):
                pass
            if text:
                self._reported[i] = text.strip().splitlines()[-1]
        return self._reported.get(i, "")

    def _dead_workers(self) -> list[str]:
        if self._stopping:
            return []
        dead = []
        for i, p in enumerate(self._procs):
            if p.exitcode is not None or not p.is_alive():
                code = p.exitcode
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                err = self._error_text(i)
                dead.append(f"rank {i + 1} (pid {p.pid}) {how}" + (f": {err}" if err else ""))
        return dead

    def _join_workers(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for p in self._procs:
            p.join(max(0.0, end - time.monotonic()))
        return all(not p.is_alive() for p in self._procs)

    def _kill_workers(self) -> None:
        for p in self._procs:
            if p.is_alive():
                try:
                    p.kill()
                except (OSError, ValueError):
                    pass

    def _reap_workers(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for p in self._procs:
            p.join(max(0.0, end - time.monotonic()))
        for c in self._errs:
            try:
                c.close()
            except OSError:
                pass
        alive = [p.pid for p in self._procs if p.is_alive()]
        if alive:
            logger.error("tensor-parallel worker process(es) %s still alive after kill", alive)
