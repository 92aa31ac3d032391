"""The Serve endpoint under load and abuse (small counts; bench/serve_abuse.py runs the same sections bigger):
a burst far over capacity, slow clients, clients that leave mid-stream, oversized and hostile bodies, and a
hypothesis pass over the request fields. Never a 5xx, 429s come fast, nothing leaks, the server recovers."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from .conftest import REL_MAX_MODEL_LEN, REL_MAX_ONGOING, REL_MAX_QUEUED, REL_MAX_REQUEST_BYTES

pytestmark = [pytest.mark.reliability, pytest.mark.ray, pytest.mark.timeout(300)]

_BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve_abuse.py"
_spec = importlib.util.spec_from_file_location("_glm4_serve_abuse", _BENCH)
abuse = importlib.util.module_from_spec(_spec)
sys.modules["_glm4_serve_abuse"] = abuse
_spec.loader.exec_module(abuse)

NO_LEAK = {"admission_slots": 0, "queued": 0, "engine_seqs": 0, "kv_blocks": 0, "streams": 0}


@pytest.fixture(scope="module")
def target(rel_serve):
    return abuse.Target(rel_serve.base_url, rel_serve.model, rel_serve.api_key)


def _no_5xx(sec) -> None:
    assert sec.classes["5xx"] == 0 and not sec.bad, (sec.row(), sec.bad)


def test_burst_far_over_capacity(target):
    n = 8 * (REL_MAX_ONGOING + REL_MAX_QUEUED)
    rejected_before = target.stats()["admission"]["rejected"]
    sec = asyncio.run(abuse.burst(target, n=n, hold_tokens=200))
    _no_5xx(sec)
    # How many succeed depends on timing (on a slow, shared machine the burst is not simultaneous and finished
    # requests free their slots for later arrivals); the bound itself does not: never more than max_ongoing
    # requests in the engine nor max_queued waiting, every refusal the replica counted seen by its client as a 429
    # (Serve's proxy may refuse a few more itself, also with 429), none lost.
    admission = target.stats()["admission"]
    assert admission["peak_ongoing"] <= REL_MAX_ONGOING and admission["peak_queued"] <= REL_MAX_QUEUED, admission
    assert sec.classes["429"] >= max(1, admission["rejected"] - rejected_before), (sec.row(), admission)
    assert sec.classes["4xx"] == 0 and sec.classes["2xx"] + sec.classes["429"] + sec.classes["none"] >= n, sec.row()
    # "At once" is Admission's own unit test (a refusal never suspends); here only that every refusal arrived while
    # the burst was on (the loop above gives up after 30 s). How fast is a number for bench/serve_abuse.py, not a
    # test: on this shared 2-core machine the first answers of a 64-connection burst alone can take ~2 s.
    assert sec.lat429 and max(sec.lat429) < 30.0, sec.lat429
    assert sec.recovered, sec.row()
    assert sec.leaked == NO_LEAK, sec.leaked


def test_clients_that_leave_mid_stream_leak_nothing(target):
    before = target.stats()
    sec = asyncio.run(abuse.disconnects(target, n=24, concurrency=REL_MAX_ONGOING, hold_tokens=32))
    _no_5xx(sec)
    assert sec.classes["2xx"] == 24, sec.row()
    assert sec.leaked == NO_LEAK, sec.leaked
    after = target.stats()
    assert after["counters"]["requests_aborted"] > before["counters"]["requests_aborted"]


def test_slow_clients_do_not_block_others(target):
    sec = asyncio.run(abuse.slow_clients(target, n_readers=2, n_trickle=6, duration_s=6))
    _no_5xx(sec)
    # Normal requests run one after another during the 6 s: at least 3 served means none waited for the slow ones
    # (a trickled body takes minutes). Their latency is bench/serve_abuse.py's to report.
    assert len(sec.normal_lat) >= 3, (sec.row(), sec.normal_lat)
    assert sec.leaked == NO_LEAK, sec.leaked


def test_oversized_and_hostile_bodies(target):
    sec = asyncio.run(abuse.hostile(target, REL_MAX_REQUEST_BYTES, REL_MAX_MODEL_LEN))
    _no_5xx(sec)
    assert sec.classes["none"] == 0, sec.notes
    assert sec.leaked == NO_LEAK, sec.leaked


def test_fuzzed_request_fields_never_5xx(target):
    sec = abuse.fuzz(target, max_examples=60, seed=1)
    _no_5xx(sec)
    assert sec.classes["none"] == 0, sec.row()
    assert sec.leaked == NO_LEAK, sec.leaked


def _replica_logs() -> list[Path]:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return sorted(logs.glob("replica_glm4-reliability_*.log"))


def test_server_healthy_after_the_abuse(target, rel_serve):
    s = target.stats()
    assert s["counters"]["requests_error"] == 0, s["counters"]
    # clients that leave are not server errors: no "unexpected error" tracebacks in the replica's log
    for log in _replica_logs():
        text = log.read_text(errors="replace")
        assert "unexpected error while handling" not in text, text[text.find("unexpected error"):][:3000]
        assert "stream " not in text or " failed" not in text
    r = rel_serve.openai().completions.create(model=rel_serve.model, prompt="still fine", max_tokens=2)
    assert r.choices[0].finish_reason in {"length", "stop"}


def test_api_key_never_logged(target, rel_serve):
    """The API key (sent right and wrong, in the args of the app) appears in no Ray log file of the session."""
    import httpx
    import ray

    with httpx.Client(base_url=rel_serve.base_url, timeout=30) as c:
        c.get("/v1/models", headers={"Authorization": f"Bearer {rel_serve.api_key}x"})
        c.get("/v1/models", headers=rel_serve.headers)
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    hits = [str(p) for p in logs.rglob("*") if p.is_file() and rel_serve.api_key.encode() in p.read_bytes()]
    assert not hits, hits
