"""Request metrics of the Serve endpoint (:class:`ServeMetrics`). The histogram buckets span what an LLM endpoint
sees: TTFT from milliseconds, end-to-end latency up to minutes-long generations.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from pipeline.serve.admission import Admission

logger = logging.getLogger("ray.serve")

_TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_LATENCY_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
_TPS_BUCKETS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]


class ServeMetrics:
    """Prometheus metrics through Ray (exported by each node's metrics agent), plus local counters for
    /admin/stats. Ray's metric classes are used when running inside Ray; otherwise only the counters exist."""

    def __init__(self, model_name: str):
        self.counters: dict[str, float] = {
            "requests_total": 0, "requests_ok": 0, "requests_4xx": 0, "requests_429": 0, "requests_error": 0,
            "requests_aborted": 0, "prompt_tokens_total": 0, "output_tokens_total": 0,
        }
        self.recent_ttft: deque[float] = deque(maxlen=1024)
        self._ray = None
        try:
            from ray.serve import metrics as m

            tags = {"model": model_name}
            self._ray = {
                "requests": m.Counter("glm4_requests", "HTTP requests by endpoint and status code.",
                                      tag_keys=("model", "endpoint", "status")),
                "ttft": m.Histogram("glm4_time_to_first_token_seconds", "Time to first token.",
                                    boundaries=_TTFT_BUCKETS, tag_keys=("model", "endpoint")),
                "latency": m.Histogram("glm4_request_latency_seconds", "End-to-end generation latency.",
                                       boundaries=_LATENCY_BUCKETS, tag_keys=("model", "endpoint")),
                "tps": m.Histogram("glm4_request_output_tokens_per_second",
                                   "Per-request decode speed (output tokens / (latency - TTFT)).",
                                   boundaries=_TPS_BUCKETS, tag_keys=("model", "endpoint")),
                "prompt_tokens": m.Counter("glm4_prompt_tokens", "Prompt tokens.", tag_keys=("model",)),
                "output_tokens": m.Counter("glm4_output_tokens", "Generated tokens (rate() = tokens/s).",
                                           tag_keys=("model",)),
                "aborted": m.Counter("glm4_requests_aborted", "Requests aborted because the client left.",
                                     tag_keys=("model",)),
                "rejected": m.Counter("glm4_requests_rejected", "Requests refused with 429 (overload).",
                                      tag_keys=("model",)),
                "ongoing": m.Gauge("glm4_ongoing_requests", "Requests admitted into the engine.",
                                   tag_keys=("model",)),
                "queued": m.Gauge("glm4_queued_requests", "Requests waiting for admission (queue depth).",
                                  tag_keys=("model",)),
                "engine_running": m.Gauge("glm4_engine_num_running", "Sequences running in the engine.",
                                          tag_keys=("model",)),
                "engine_waiting": m.Gauge("glm4_engine_num_waiting", "Sequences waiting in the engine.",
                                          tag_keys=("model",)),
                "kv_usage": m.Gauge("glm4_kv_cache_usage", "Fraction of KV-cache blocks in use.",
                                    tag_keys=("model",)),
            }
            for metric in self._ray.values():
                metric.set_default_tags(dict(tags))
        except Exception as e:  # pragma: no cover - outside Ray
            logger.info("Ray metrics unavailable (%s); keeping local counters only", e)
            self._ray = None

    def _call(self, name: str, method: str, value: float, tags: dict[str, str] | None = None) -> None:
        if self._ray is not None:
            try:
                getattr(self._ray[name], method)(value, tags=dict(tags or {}))
            except Exception:  # metrics must never fail a request
                pass

    def request_done(self, endpoint: str, status: int) -> None:
        self.counters["requests_total"] += 1
        if status == 200:
            self.counters["requests_ok"] += 1
        elif status == 429:
            self.counters["requests_429"] += 1
            self._call("rejected", "inc", 1)
        elif 400 <= status < 500:
            self.counters["requests_4xx"] += 1
        elif status == 499:
            pass
        else:
            self.counters["requests_error"] += 1
        self._call("requests", "inc", 1, {"endpoint": endpoint, "status": str(status)})

    def ttft(self, endpoint: str, seconds: float) -> None:
        self.recent_ttft.append(seconds)
        self._call("ttft", "observe", seconds, {"endpoint": endpoint})

    def finished(self, endpoint: str, latency: float, ttft: float | None, prompt_tokens: int,
                 output_tokens: int) -> None:
        self.counters["prompt_tokens_total"] += prompt_tokens
        self.counters["output_tokens_total"] += output_tokens
        self._call("latency", "observe", latency, {"endpoint": endpoint})
        self._call("prompt_tokens", "inc", prompt_tokens)
        self._call("output_tokens", "inc", output_tokens)
        if ttft is not None and output_tokens > 1 and latency > ttft:
            self._call("tps", "observe", (output_tokens - 1) / (latency - ttft), {"endpoint": endpoint})

    def aborted(self, n: int = 1) -> None:
        self.counters["requests_aborted"] += n
        self._call("aborted", "inc", n)

    def gauges(self, admission: Admission, stats: dict[str, Any]) -> None:
        self._call("ongoing", "set", admission.ongoing)
        self._call("queued", "set", admission.queued)
        if stats:
            self._call("engine_running", "set", float(stats.get("num_running", 0)))
            self._call("engine_waiting", "set", float(stats.get("num_waiting", 0)))
            total = float(stats.get("kv_blocks_total", 0) or 0)
            if total:
                self._call("kv_usage", "set", 1.0 - float(stats.get("kv_blocks_free", 0)) / total)
