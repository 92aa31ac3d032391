"""Progress of a batch job: a tracker actor the replicas report to, and the console lines the driver prints.

Replicas report rows as they finish them, their start-up phase (model download, engine start) and, every few
seconds, their engine occupancy (running sequences / max_num_seqs). The driver prints one line per interval: the
phase while no row is done yet (so a user sees what the job waits for), rows, rate and ETA after. Counts here are
for people and dashboards (a retried batch may be counted twice); the manifest's counts come from the written
files.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)

# Occupancy samples kept for the manifest: the series is downsampled (every other point dropped) past this.
MAX_OCCUPANCY_POINTS = 256
# A replica's occupancy older than this is stale (the replica died or finished) and no longer counted.
STALE_REPLICA_S = 30.0


def error_kind(message: str) -> str:
    """'prompt too long: 9000 tokens ...' -> 'prompt too long'. The one place error messages become kinds."""
    return message.split(":", 1)[0].strip()


def count_error_kinds(errors) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for e in errors:
        if e is not None:
            k = error_kind(e)
            kinds[k] = kinds.get(k, 0) + 1
    return kinds


class ProgressTracker:
    """Runs as a Ray actor (`num_cpus=0`): counts finished rows, keeps each replica's phase, latest engine stats
    and an occupancy series."""

    def __init__(self, total: int, done_before: int):
        self.total, self.done_before = total, done_before
        self.rows = self.errors = self.prompt_tokens = self.gen_tokens = 0
        self.kinds: dict[str, int] = {}
        self.replicas: dict[str, dict] = {}
        self.phases: dict[str, tuple[str, float]] = {}  # replica -> (phase, since)
        self.members: dict[str, dict] = {}  # replica -> where it runs and what Ray gave it
        self.occupancy: dict[str, tuple[float, int, int, int]] = {}  # replica -> (t, running, waiting, slots)
        self.series: list[tuple[float, float]] = []  # (seconds since start, pool occupancy)
        self.engine_deaths: dict[str, str] = {}
        self.driver_phase: tuple[str, float] = ("starting", time.time())
        self.t0 = time.time()
        self._metrics = _make_metrics()

    def add(self, rows: int, errors: int, prompt_tokens: int, gen_tokens: int, kinds: dict[str, int]) -> None:
        self.rows += rows
        self.errors += errors
        self.prompt_tokens += prompt_tokens
        self.gen_tokens += gen_tokens
        for k, v in kinds.items():
            self.kinds[k] = self.kinds.get(k, 0) + v
        if self._metrics:
            m = self._metrics
            m["rows"].inc(rows)
            if errors:
                m["errors"].inc(errors)
            if gen_tokens:
                m["tokens"].inc(gen_tokens)
            m["progress"].set(min(1.0, (self.done_before + self.rows) / max(self.total, 1)))

    def set_driver_phase(self, phase: str) -> None:
        self.driver_phase = (phase, time.time())

    def replica_phase(self, replica_id: str, phase: str, placement: dict | None = None) -> None:
        self.phases[replica_id] = (phase, time.time())
        self.members[replica_id] = {**(placement or {}), "phase": phase}

    def engine_died(self, replica_id: str, error: str) -> int:
        """A replica's engine died; return how many replica processes lost their engine in this job (the restart
        budget). Keyed by replica process, so the several in-flight batches of one dead engine count once."""
        self.engine_deaths.setdefault(replica_id, error)
        return len(self.engine_deaths)

    def replica_stats(self, replica_id: str, stats: dict) -> None:
        now = time.time()
        self.replicas[replica_id] = stats
        slots = int(stats.get("max_num_seqs") or 0)
        if slots:
            self.occupancy[replica_id] = (now, int(stats.get("num_running", 0)), int(stats.get("num_waiting", 0)),
                                          slots)
            self.series.append((round(now - self.t0, 1), self.pool_occupancy(now)))
            if len(self.series) > MAX_OCCUPANCY_POINTS:
                self.series = self.series[::2]

    def pool_occupancy(self, now: float | None = None) -> float | None:
        """Running sequences / sequence slots over the replicas that reported recently."""
        now = time.time() if now is None else now
        live = [o for o in self.occupancy.values() if now - o[0] <= STALE_REPLICA_S]
        slots = sum(o[3] for o in live)
        return sum(o[1] for o in live) / slots if slots else None

    def snapshot(self) -> dict:
        now = time.time()
        return {
            "total": self.total,
            "done_before": self.done_before,
            "rows": self.rows,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "error_kinds": dict(self.kinds),
            "elapsed_s": now - self.t0,
            "replicas": dict(self.replicas),
            "driver_phase": [self.driver_phase[0], now - self.driver_phase[1]],
            "replica_phases": {r: [p, now - t] for r, (p, t) in self.phases.items()},
            "members": dict(self.members),
            "occupancy": self.pool_occupancy(now),
            "occupancy_mean": step_occupancy(self.replicas),
            "occupancy_series": list(self.series),
        }


def _make_metrics() -> dict | None:
    """Counters for the Ray dashboard (Prometheus/Grafana); best effort, the job runs without them."""
    try:
        from ray.util.metrics import Counter, Gauge

        return {
            "rows": Counter("glm4_batch_rows_done", description="Rows finished by the glm4 batch job."),
            "errors": Counter("glm4_batch_rows_error", description="Error rows of the glm4 batch job."),
            "tokens": Counter("glm4_batch_generated_tokens", description="Tokens generated by the glm4 batch job."),
            "progress": Gauge("glm4_batch_progress", description="Fraction of input rows done."),
        }
    except Exception:  # metrics agent unavailable (minimal install): console progress only
        return None


def safe_get(ref, timeout: float = 10.0) -> dict:
    import ray

    try:
        return ray.get(ref, timeout=timeout)
    except Exception as e:  # progress is never a reason to fail the job
        logger.warning("progress tracker unavailable: %s", e)
        return {}


class ProgressPrinter:
    """Prints `format_progress` of the tracker's snapshot every `interval_s` seconds on a daemon thread."""

    def __init__(self, tracker, say: Callable[[str], None], interval_s: float):
        self._tracker, self._say, self._interval = tracker, say, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="glm4-batch-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            snap = safe_get(self._tracker.snapshot.remote(), timeout=max(self._interval, 5.0))
            if snap:
                self._say(format_progress(snap))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def format_phase(s: dict) -> str:
    """What the job is waiting for before its first row: the replicas' phases, or the driver's."""
    phases = s.get("replica_phases") or {}
    if not phases:
        name, waited = s.get("driver_phase") or ("starting", 0.0)
        return f"{name} ({waited:.0f}s)"
    by_phase: dict[str, list[float]] = {}
    for name, waited in phases.values():
        by_phase.setdefault(name, []).append(waited)
    return ", ".join(f"{name} on {len(w)} replica(s) ({max(w):.0f}s)" for name, w in sorted(by_phase.items()))


def format_progress(s: dict) -> str:
    done = min(s["done_before"] + s["rows"], s["total"])  # a retried batch may be counted twice
    total = max(s["total"], 1)
    el = max(s["elapsed_s"], 1e-9)
    rate = s["rows"] / el
    eta = (s["total"] - done) / rate if rate > 0 else float("nan")
    eta_s = "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(max(eta, 0)))
    hit = engine_hit_rate(s.get("replicas", {}))
    occ = s.get("occupancy")
    line = (
        f"[glm4-batch] {done}/{s['total']} rows ({100.0 * done / total:.1f}%) | {rate:.2f} rows/s | "
        f"{s['gen_tokens'] / el:.1f} gen tok/s | errors {s['errors']} | ETA {eta_s}"
        + (f" | engine occupancy {occ:.0%}" if occ is not None else "")
        + (f" | prefix-cache hit {hit:.1%}" if hit is not None else "")
    )
    if s["rows"] == 0:
        line += f" | phase: {format_phase(s)}"
    return line


def step_occupancy(replicas: dict[str, dict]) -> float | None:
    """Mean engine batch occupancy over every step the replicas took: decoded tokens (one per running sequence
    per step) / (steps x max_num_seqs), from each replica's cumulative counters. Unlike the sampled series it
    counts every step, so a short job whose samples all fall between bursts still reads right."""
    steps = sum(st.get("num_steps", 0) * st.get("max_num_seqs", 0) for st in replicas.values())
    return sum(st.get("num_decode_tokens", 0) for st in replicas.values()) / steps if steps else None


def engine_hit_rate(replicas: dict[str, dict]) -> float | None:
    """Pool-wide prefix-cache hit rate (cached / looked-up prompt tokens) from each replica's latest cumulative
    engine counters; covers this run's replicas (a restarted replica's counters start again from zero)."""
    hits = sum(st.get("prefix_cache_hit_tokens", 0) for st in replicas.values())
    queries = sum(st.get("prefix_cache_query_tokens", 0) for st in replicas.values())
    return hits / queries if queries else None
