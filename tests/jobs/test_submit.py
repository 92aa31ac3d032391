"""Job specs, idempotent submission, address handling and schedules, without a Ray cluster.

The Ray client is replaced by a recording fake (`FakeSDK`) so each test can assert *which* cluster calls happened;
address tests use a closed localhost port, a socket that never answers, and a tiny fake dashboard.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
import yaml
from pydantic import ValidationError

from jobs import cli
from jobs.kube import launch_rayjob, load_rayjob_template
from jobs.schedule import Schedule, parse_tick, resolve_tick, schedule_from_yaml
from jobs.submit import (
    CONFIG_ENV_VAR,
    ClusterUnreachableError,
    GLM4JobClient,
    JobNotFoundError,
    JobSpec,
    JobWaitTimeout,
    resolve_address,
    sanitize_name,
)

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
UTC = timezone.utc


def job_config(**over) -> dict:
    return {"input": "/data/prompts.parquet", "output": "/data/out/run1/", "model": "/models/tiny",
            "prompt_column": "prompt", **over}


def spec(**over) -> JobSpec:
    return JobSpec(**{"name": "glm4-adhoc", "job": job_config(), **over})


class FakeSDK:
    """Records every call; behaves like Ray's JobSubmissionClient for the calls GLM4JobClient makes."""

    def __init__(self, submit_errors: list[Exception] | None = None, statuses: list[str] | None = None):
        self.calls: list[tuple[str, object]] = []
        self.jobs: dict[str, SimpleNamespace] = {}
        self.submit_errors = list(submit_errors or [])
        self.statuses = list(statuses or [])

    def get_job_info(self, sid):
        self.calls.append(("get_job_info", sid))
        if sid not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {sid} does not exist.")
        job = self.jobs[sid]
        if self.statuses:
            job.status = self.statuses.pop(0)
        return job

    def submit_job(self, **kw):
        self.calls.append(("submit_job", kw))
        if self.submit_errors:
            raise self.submit_errors.pop(0)
        sid = kw["submission_id"]
        self.jobs[sid] = SimpleNamespace(submission_id=sid, status="PENDING", metadata=kw.get("metadata"),
                                         start_time=len(self.jobs))
        return sid

    def list_jobs(self):
        self.calls.append(("list_jobs", None))
        return list(self.jobs.values())

    def get_job_logs(self, sid):
        self.calls.append(("get_job_logs", sid))
        return "hello\n"

    def stop_job(self, sid):
        self.calls.append(("stop_job", sid))
        return True

    async def tail_job_logs(self, sid):
        for chunk in ("a\n", "b\n"):
            yield chunk


# ------------------------------------------------------------------------------------- spec validation

BAD_SPECS = {
    "unknown top-level key": {"name": "x", "job": job_config(), "entrypoint_num_cpu": 1},
    "unknown job config key": {"name": "x", "job": job_config(batchsize=8)},
    "job config without prompt/messages column": {"name": "x", "job": job_config(prompt_column=None)},
    "job config missing output": {"name": "x", "job": {k: v for k, v in job_config().items() if k != "output"}},
    "runtime_env typo (Ray would ignore it)": {"name": "x", "job": job_config(), "runtime_env": {"envvars": {}}},
    "runtime_env env var not a string": {"name": "x", "job": job_config(), "runtime_env": {"env_vars": {"A": 1}}},
    "reserved env var": {"name": "x", "job": job_config(), "runtime_env": {"env_vars": {CONFIG_ENV_VAR: "x"}}},
    "naive scheduled_time": {"name": "x", "job": job_config(), "scheduled_time": "2026-11-28T02:00:00"},
    "reserved metadata key": {"name": "x", "job": job_config(), "metadata": {"glm4_name": "y"}},
    "negative gpus": {"name": "x", "job": job_config(), "entrypoint_num_gpus": -1},
    "bad explicit submission id": {"name": "x", "job": job_config(), "submission_id": "has space"},
    "empty command": {"name": "x", "job": job_config(), "command": []},
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_fails_before_any_cluster_call(case):
    """A bad spec must never reach the cluster (no half-submitted run, no wasted GPU start-up)."""
    fake = FakeSDK()
    client = GLM4JobClient.from_sdk(fake)
    with pytest.raises(ValidationError):
        client.submit(BAD_SPECS[case])
    assert fake.calls == [], f"{case}: the client talked to the cluster before validating: {fake.calls}"


def test_cli_submit_of_bad_spec_exits_2_without_connecting(tmp_path):
    """The CLI validates the file before it resolves or probes the address (a closed port would give exit 3)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "job": job_config(batchsize=1)}))
    assert cli.main(["submit", str(bad), "--address", f"http://127.0.0.1:{closed_port()}"]) == cli.EXIT_INVALID


# ---------------------------------------------------------------------------------- deterministic ids


def test_submission_id_is_deterministic_and_ignores_metadata_and_env(monkeypatch):
    a = spec()
    monkeypatch.setenv("GLM4_MODEL_CACHE", "/elsewhere")  # env-dependent config defaults must not change the id
    b = spec(metadata={"submitted_by": "someone-else"})
    assert a.effective_submission_id == b.effective_submission_id
    assert a.effective_submission_id.startswith("glm4-adhoc-") and len(a.effective_submission_id) == 11 + 12
    assert spec(job=job_config(output="/data/out/run2/")).effective_submission_id != a.effective_submission_id
    assert spec(attempt=2).effective_submission_id == a.effective_submission_id + "-a2"
    assert spec(submission_id="mine-1").effective_submission_id == "mine-1"


def test_submission_id_is_stable_across_processes():
    """The id of a retried submit from another process (another PYTHONHASHSEED) must be the same."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from jobs.submit import JobSpec; "
            f"print(JobSpec(name='glm4-adhoc', job={job_config()!r}).effective_submission_id)")
    out = subprocess.run([PY, "-c", code, str(REPO)], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == spec().effective_submission_id


def test_scheduled_id_uses_name_and_utc_time():
    berlin = datetime(2026, 11, 28, 3, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    s = spec(name="Nightly GLM4 / EU", scheduled_time=berlin)
    assert s.effective_submission_id == "nightly-glm4-eu-20261128-0200"
    assert s.full_metadata()["glm4_scheduled_time"] == "2026-11-28T02:00:00+00:00"
    assert sanitize_name("9-lives") == "j-9-lives" and len(sanitize_name("a" * 80)) == 30


def test_entrypoint_and_runtime_env_carry_the_config():
    s = spec(runtime_env={"env_vars": {"NCCL_DEBUG": "WARN"}}, command=["python", "-c", "x", "{config}"])
    assert shlex.split(s.entrypoint()) == ["python", "-m", "jobs.cli", "run-with-config", "--",
                                           "python", "-c", "x", "{config}"]
    assert shlex.split(spec().entrypoint())[-5:] == ["python", "-m", "jobs.batch", "--config", "{config}"]
    env = s.submit_kwargs()["runtime_env"]["env_vars"]
    assert env["NCCL_DEBUG"] == "WARN" and yaml.safe_load(env[CONFIG_ENV_VAR]) == s.job
    assert s.runtime_env == {"env_vars": {"NCCL_DEBUG": "WARN"}}, "the spec itself must not be mutated"


def test_run_with_config_writes_the_file_and_execs(tmp_path):
    """Driver side of the entrypoint: the config reaches the command as a file path."""
    config = yaml.safe_dump(job_config())
    out = subprocess.run(
        [PY, "-m", "jobs.cli", "run-with-config", "--", PY, "-c", "import sys; print(open(sys.argv[1]).read())",
         "{config}"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, CONFIG_ENV_VAR: config, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == job_config()
    missing = subprocess.run([PY, "-m", "jobs.cli", "run-with-config", "--", "true"], capture_output=True,
                             text=True, timeout=120, cwd=REPO,
                             env={k: v for k, v in os.environ.items() if k != CONFIG_ENV_VAR})
    assert missing.returncode == cli.EXIT_INVALID and CONFIG_ENV_VAR in missing.stderr


# ------------------------------------------------------------------------------- idempotent submission


def test_second_submit_of_same_spec_starts_nothing():
    fake = FakeSDK()
    client = GLM4JobClient.from_sdk(fake)
    first = client.submit_with_result(spec())
    second = client.submit_with_result(spec(metadata={"retry": "1"}))
    assert first.created and not second.created
    assert first.submission_id == second.submission_id
    assert [c for c, _ in fake.calls].count("submit_job") == 1


def test_lost_race_already_exists_is_success():
    """get_job_info said 'absent' but a concurrent submit won: Ray's 'already exists' error means success."""
    sid = spec().effective_submission_id
    fake = FakeSDK(submit_errors=[RuntimeError(f"Request failed with status code 500: Job with submission_id "
                                               f"{sid} already exists. Please use a different submission_id.")])
    client = GLM4JobClient.from_sdk(fake)
    orig = fake.get_job_info
    seen = []

    def get_job_info(s):  # absent on the first look, present afterwards (the other submitter created it)
        seen.append(s)
        if len(seen) > 1:
            fake.jobs[s] = SimpleNamespace(submission_id=s, status="RUNNING", metadata={}, start_time=0)
        return orig(s)

    fake.get_job_info = get_job_info
    res = client.submit_with_result(spec())
    assert (res.submission_id, res.created, res.status) == (sid, False, "RUNNING")


def test_submit_retries_while_head_has_no_agent():
    fake = FakeSDK(submit_errors=[RuntimeError("Request failed with status code 500: No available agent to "
                                               "submit job, please try again later.")])
    res = GLM4JobClient.from_sdk(fake).submit_with_result(spec())
    assert res.created and [c for c, _ in fake.calls].count("submit_job") == 2


def test_failed_run_is_not_resubmitted_but_attempt_2_is(caplog):
    fake = FakeSDK()
    client = GLM4JobClient.from_sdk(fake)
    sid = client.submit(spec())
    fake.jobs[sid].status = "FAILED"
    with caplog.at_level(logging.WARNING, logger="jobs.submit"):
        res = client.submit_with_result(spec())
    assert not res.created and res.status == "FAILED" and "attempt" in caplog.text
    assert client.submit_with_result(spec(attempt=2)).created


def test_queries_wait_tail_stop_list():
    fake = FakeSDK(statuses=["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"])
    client = GLM4JobClient.from_sdk(fake)
    sid = client.submit(spec())
    other = client.submit(spec(name="other"))
    assert str(client.wait(sid, timeout_s=10, poll_s=0.01)) == "SUCCEEDED"
    assert client.logs(sid) == "hello\n" and list(client.tail_logs(sid)) == ["a\n", "b\n"]
    assert client.stop(sid) is True
    assert [j.submission_id for j in client.list(name="other")] == [other]
    with pytest.raises(JobNotFoundError):
        client.status("nope")


def test_wait_is_bounded():
    fake = FakeSDK(statuses=["RUNNING"] * 1000)
    client = GLM4JobClient.from_sdk(fake)
    sid = client.submit(spec())
    t0 = time.monotonic()
    with pytest.raises(JobWaitTimeout, match="RUNNING"):
        client.wait(sid, timeout_s=0.5, poll_s=0.05)
    assert time.monotonic() - t0 < 5  # bounded, not a speed test: slack for a loaded machine


# ------------------------------------------------------------------------------------------- addresses


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def no_address_env(monkeypatch):
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(k, raising=False)


def test_closed_port_fails_fast_with_the_address(no_address_env):
    url = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(ClusterUnreachableError) as e:
        GLM4JobClient(url, timeout_s=2)
    assert time.monotonic() - t0 < 8
    assert url in str(e.value) and "unreachable" in str(e.value)


def test_silent_server_fails_within_timeout(no_address_env):
    """A host that accepts TCP but never answers (firewall/blackhole) must not hang the caller."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)  # the kernel completes handshakes; nobody ever reads or answers
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(ClusterUnreachableError, match="no answer within 1s"):
            GLM4JobClient(url, timeout_s=1)
        assert time.monotonic() - t0 < 8


class _FakeDashboard(http.server.BaseHTTPRequestHandler):
    paths: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).paths.append(self.path)
        body, code = (json.dumps({"ray_version": "2.60.0", "version": "x"}), 200) if self.path == "/api/version" \
            else ("not found", 404)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *a):
        pass


@pytest.fixture()
def fake_dashboard():
    _FakeDashboard.paths = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeDashboard)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_explicit_address_wins_over_ray_address_env(monkeypatch, fake_dashboard, caplog):
    """Ray's own client would follow RAY_ADDRESS (here: a dead port); ours uses the explicit address and says so."""
    dead = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with caplog.at_level(logging.WARNING, logger="jobs.submit"):
        client = GLM4JobClient(fake_dashboard, timeout_s=2)
    assert (client.address, client.address_source) == (fake_dashboard, "argument")
    assert "ignoring RAY_ADDRESS" in caplog.text
    assert _FakeDashboard.paths.count("/api/version") >= 2, "Ray's client must have checked *our* server"
    assert os.environ["RAY_ADDRESS"] == dead, "the env var must be restored after constructing Ray's client"


def test_env_addresses_are_the_fallback_in_rays_order(monkeypatch, fake_dashboard):
    dead = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(ClusterUnreachableError, match="from env RAY_ADDRESS"):
        GLM4JobClient(timeout_s=1)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", fake_dashboard)
    assert GLM4JobClient(timeout_s=2).address_source == "env RAY_API_SERVER_ADDRESS"


def test_non_dashboard_addresses_are_rejected_clearly(monkeypatch, no_address_env, fake_dashboard):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what a Ray job driver sees: the GCS address
    with pytest.raises(ValueError, match="not a dashboard URL"):
        resolve_address(None)
    with pytest.raises(ClusterUnreachableError, match="HTTP 404: not a Ray dashboard"):
        from jobs.submit import probe_dashboard

        probe_dashboard(fake_dashboard + "/sub", timeout_s=2)


def test_cli_unreachable_exit_code(no_address_env, capsys):
    rc = cli.main(["status", "x", "--address", f"http://127.0.0.1:{closed_port()}", "--connect-timeout-s", "1"])
    assert rc == cli.EXIT_UNREACHABLE and "unreachable" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- schedules

SCHEDULE = {"name": "glm4-nightly", "cron": "0 2 * * *", "time_zone": "Europe/Berlin",
            "job": job_config(output="s3://b/out/dt={date}/")}


@pytest.mark.parametrize("bad", [
    {"cron": "0 2 * *"}, {"cron": "0 0 2 * * *"}, {"cron": "@daily"}, {"cron": "TZ=UTC 0 2 * * *"},
    {"time_zone": "Mars/Olympus"}, {"job": job_config(output="s3://b/out/")}, {"name": "Has_Upper"},
    {"name": "x" * 31}, {"concurrency": "Forbid"}, {"job": job_config(output="s3://b/{date}/", batchsize=1)},
])
def test_bad_schedules_are_rejected(bad):
    with pytest.raises(ValidationError):
        Schedule.model_validate({**SCHEDULE, **bad})


def test_same_tick_same_id_and_output_prefix():
    s = Schedule.model_validate(SCHEDULE)
    tick = s.latest_tick(datetime(2026, 11, 28, 12, 0, tzinfo=UTC))
    assert tick == datetime(2026, 11, 28, 2, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    a, b = s.job_spec(tick), s.job_spec(tick)
    assert a.effective_submission_id == b.effective_submission_id == "glm4-nightly-20261128-0100"
    assert a.job["output"] == "s3://b/out/dt=2026-11-28/"  # the local date of the tick


def test_tick_resolution_order():
    s = Schedule.model_validate(SCHEDULE)
    tick = datetime(2026, 11, 27, 1, 0, tzinfo=UTC)  # 02:00 Berlin
    minutes = int(tick.timestamp()) // 60
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    # RayCronJob child: RayJob <name>-<unix minutes>, Ray submission id + '-<5 random chars>'
    assert resolve_tick(s, "auto", [f"glm4-nightly-{minutes}-x7k2p"], now)[0] == tick
    # batch/v1 CronJob Job name
    assert resolve_tick(s, None, [f"glm4-nightly-{minutes}"], now)[0] == tick
    # a time that is not a tick of the schedule, or another schedule's name, is ignored -> latest tick
    assert resolve_tick(s, "auto", [f"glm4-nightly-{minutes + 1}", f"other-{minutes}"], now)[1] == \
        "latest tick before now"
    assert resolve_tick(s, "2026-11-27T02:00:00+01:00", [], now)[0] == tick
    with pytest.raises(ValueError, match="not a tick"):
        parse_tick(s, "2026-11-27T02:05:00+01:00")


def test_run_scheduled_driver_renders_its_own_tick(tmp_path):
    """What a RayCronJob child runs: the tick comes from its Ray submission id, the config from the env."""
    s = Schedule.model_validate(SCHEDULE)
    minutes = int(datetime(2026, 11, 27, 1, 0, tzinfo=UTC).timestamp()) // 60
    env = {**os.environ, "GLM4_SCHEDULE_YAML": s.to_yaml(), "TMPDIR": str(tmp_path),
           "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"metadata": {"job_submission_id":
                                                                   f"glm4-nightly-{minutes}-ab12c"}})}
    out = subprocess.run([PY, "-m", "jobs.cli", "run-scheduled", "--", PY, "-c",
                          "import sys; print(open(sys.argv[1]).read())", "{config}"],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["output"] == "s3://b/out/dt=2026-11-27/"
    assert schedule_from_yaml(s.to_yaml()) == s


class FakeK8s:
    namespace = "batch"

    def __init__(self, statuses):
        self.objects, self.statuses, self.calls = {}, list(statuses), []

    def request(self, method, path, body=None):
        self.calls.append((method, path))
        if method == "POST":
            name = body["metadata"]["name"]
            if name in self.objects:
                return 409, {"reason": "AlreadyExists"}
            self.objects[name] = body
            return 201, body
        return 200, {"status": {"jobDeploymentStatus": self.statuses.pop(0)}}


def test_launcher_creates_one_rayjob_per_tick_and_waits():
    """A retried CronJob launcher pod must not start a second run of the same tick."""
    s = Schedule.model_validate(SCHEDULE)
    tick = s.latest_tick(datetime(2026, 11, 28, 12, 0, tzinfo=UTC))
    template = load_rayjob_template(REPO / "infra" / "rayjob-batch.yaml")
    api = FakeK8s(["Initializing", "Running", "Complete"])
    assert launch_rayjob(s.job_spec(tick), template, api, wait=True, poll_s=0) == "Complete"
    assert launch_rayjob(s.job_spec(tick), template, api) == "Exists"
    assert list(api.objects) == ["glm4-nightly-20261128-0100"]
    rj = api.objects["glm4-nightly-20261128-0100"]["spec"]
    assert rj["jobId"] == "glm4-nightly-20261128-0100"
    assert yaml.safe_load(yaml.safe_load(rj["runtimeEnvYAML"])["env_vars"][CONFIG_ENV_VAR])["output"] == \
        "s3://b/out/dt=2026-11-28/"


def test_longest_names_fit_kuberay_limits(capsys):
    """A 30-char schedule name with a retry suffix still makes a valid RayJob name (<= 47 chars)."""
    from jobs.kube import rayjob_from_spec

    s = Schedule.model_validate({**SCHEDULE, "name": "a" * 30})
    tick = s.latest_tick(datetime(2026, 11, 28, 12, 0, tzinfo=UTC))
    rj = rayjob_from_spec(s.job_spec(tick, attempt=9), load_rayjob_template(REPO / "infra" / "rayjob-batch.yaml"))
    assert len(rj["metadata"]["name"]) == 47
    assert len(spec(name="b" * 63, attempt=9).effective_submission_id) <= 47
    argv = ["render-rayjob", "--schedule", str(REPO / "jobs" / "schedules" / "glm4-nightly.yaml"),
            "--tick", "2026-11-27T02:00:00Z", "--attempt", "2"]
    assert cli.main(argv) == cli.EXIT_OK
    assert yaml.safe_load(capsys.readouterr().out)["spec"]["jobId"] == "glm4-nightly-20261127-0200-a2"
