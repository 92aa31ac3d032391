"""The submission API against a real local Ray head (Jobs API over HTTP, real job drivers).

The head is started by this module (`ray start --head --block` on its own ports and temp dir, token auth off,
.venv/bin first on PATH so job entrypoints find the project's `python`) and stopped by killing its process group,
never with `ray stop` (that would kill every Ray on a shared machine).

Switching to the real batch pipeline: set `E2E_COMMAND = None` (the default entrypoint, `python -m jobs.batch
--config {config}`) and make `e2e_job_config` return a config for the tiny checkpoint and a small local prompts
file; then assert on the outputs in `test_submit_wait_logs_and_metadata`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml
from pydantic import ValidationError

from jobs import cli
from jobs.submit import ClusterUnreachableError, GLM4JobClient, JobSpec
from tests.pipeline.ray_nodes import free_port, stop_group

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
MARKER = "GLM4-E2E-OK"
# What the e2e job runs after `jobs.cli run-with-config` wrote its config: prints a marker and the config file.
# The marker is assembled at run time: the logs also echo the entrypoint, which must not count as output.
E2E_COMMAND: list[str] | None = [
    "python", "-c", "import sys; print('GLM4-E2E' + '-OK'); print(open(sys.argv[1]).read(), end='')", "{config}"]


def e2e_job_config(tmp: Path) -> dict:
    return {"input": str(tmp / "prompts.parquet"), "output": str(tmp / "out"), "model": str(tmp / "model"),
            "prompt_column": "prompt", "num_replicas": 1, "replica_num_cpus": 0.5, "device": "cpu"}


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = {k: free_port() for k in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                       "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
                                       "dashboard-agent-grpc-port", "runtime-env-agent-port")}
    lo = random.randrange(20000, 29000, 100)  # worker ports below the ephemeral range the ports above come from
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}",
               TMPDIR=temp_dir)  # drivers write their config files there; removed with the head
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", f"--temp-dir={temp_dir}",
           f"--object-store-memory={100 * 1024 * 1024}", f"--min-worker-port={lo}", f"--max-worker-port={lo + 99}",
           "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # own process group: stopped by pgid, not `ray stop`
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 150
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Ray dashboard not up after 150s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        head = SimpleNamespace(address=address, gcs_port=ports["port"], proc=proc)
        yield head
        client = GLM4JobClient(address, timeout_s=5)
        for job in client.list():  # drivers run in their own sessions: stop them before the head goes
            if str(job.status) in ("PENDING", "RUNNING") and job.submission_id:
                client.stop(job.submission_id)
    finally:
        stop_group(proc, grace_s=8.0)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def client(ray_head, monkeypatch_module):
    # An explicit address must win even if the environment points elsewhere (here: nowhere).
    monkeypatch_module.setenv("RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")
    return GLM4JobClient(ray_head.address, timeout_s=10)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def make_spec(job_dir: Path, **over) -> JobSpec:
    return JobSpec(**{"name": "glm4-e2e", "job": e2e_job_config(job_dir), "command": E2E_COMMAND,
                      "metadata": {"suite": "e2e"}, **over})


def test_submit_wait_logs_and_metadata(client, job_dir):
    spec = make_spec(job_dir)
    res = client.submit_with_result(spec)
    assert res.created and res.submission_id == spec.effective_submission_id
    status = client.wait(res.submission_id, timeout_s=180, poll_s=1)
    logs = client.logs(res.submission_id)
    assert str(status) == "SUCCEEDED", f"job ended {status}; logs:\n{logs[-3000:]}"
    assert MARKER in logs and f"output: {job_dir / 'out'}" in logs, logs[-3000:]
    info = client.info(res.submission_id)
    assert info.metadata["glm4_name"] == "glm4-e2e" and info.metadata["suite"] == "e2e"
    assert info.metadata["glm4_spec_hash"] == spec.spec_hash()
    assert "".join(client.tail_logs(res.submission_id, timeout_s=60)).count(MARKER) == 1


def test_same_spec_twice_is_one_job(client, job_dir):
    spec = make_spec(job_dir)  # same logical run as the test above (or its first submit, when run alone)
    first = client.submit_with_result(spec)
    again = client.submit_with_result(make_spec(job_dir, metadata={"suite": "e2e", "retry": "yes"}))
    assert again.submission_id == first.submission_id and not again.created
    assert [j.submission_id for j in client.list(name="glm4-e2e")] == [first.submission_id]
    client.wait(first.submission_id, timeout_s=180)


def test_stop_stops_a_running_job(client, job_dir):
    spec = make_spec(job_dir, name="glm4-e2e-sleeper",
                     command=["python", "-c", "import time; print('sleeping', flush=True); time.sleep(600)"])
    sid = client.submit(spec)
    deadline = time.monotonic() + 120
    while "sleeping" not in client.logs(sid):  # RUNNING and past the exec into the real command
        assert time.monotonic() < deadline, f"job never started: {client.status(sid)}"
        time.sleep(1)
    t0 = time.monotonic()
    assert client.stop(sid) is True
    assert str(client.wait(sid, timeout_s=60)) == "STOPPED"
    assert time.monotonic() - t0 < 60


def test_bad_spec_never_reaches_the_cluster(client, job_dir):
    before = len(client.list())
    with pytest.raises(ValidationError):
        client.submit({"name": "glm4-e2e-bad", "job": {**e2e_job_config(job_dir), "prompt_colum": "p"}})
    assert len(client.list()) == before


def test_gcs_port_instead_of_dashboard_fails_fast(ray_head):
    """The classic mistake: the GCS address (6379-style) instead of the dashboard URL."""
    t0 = time.monotonic()
    with pytest.raises(ClusterUnreachableError, match=str(ray_head.gcs_port)):
        GLM4JobClient(f"http://127.0.0.1:{ray_head.gcs_port}", timeout_s=3)
    assert time.monotonic() - t0 < 10


def test_cli_against_the_head(ray_head, client, job_dir, capsys):
    sid = make_spec(job_dir).effective_submission_id
    assert cli.main(["wait", sid, "--address", ray_head.address, "--timeout-s", "120"]) == cli.EXIT_OK
    assert cli.main(["list", "--name", "glm4-e2e", "--address", ray_head.address]) == cli.EXIT_OK
    assert sid in capsys.readouterr().out
    assert cli.main(["status", "no-such-job", "--address", ray_head.address]) == cli.EXIT_NOT_FOUND


def test_cli_submit_schedule_tick_twice_is_one_job(ray_head, client, job_dir, capsys):
    """The VM-cron path: `glm4-jobs submit-schedule` for one tick; a re-fired tick finds the same job."""
    sched = job_dir / "sched.yaml"
    sched.write_text(yaml.safe_dump({"name": "glm4-e2e-sched", "cron": "0 2 * * *", "command": E2E_COMMAND,
                                     "job": {**e2e_job_config(job_dir), "output": str(job_dir / "dt={date}")}}))
    argv = ["submit-schedule", str(sched), "--tick", "2026-11-28T02:00:00+00:00", "--address", ray_head.address]
    assert cli.main([*argv, "--wait", "--timeout-s", "180"]) == cli.EXIT_OK
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["submission_id"] == "glm4-e2e-sched-20261128-0200" and first["created"]
    assert cli.main(argv) == cli.EXIT_OK
    second = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (second["submission_id"], second["created"]) == (first["submission_id"], False)
    assert f"output: {job_dir / 'dt=2026-11-28'}" in client.logs(first["submission_id"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_batch_job_on_the_tiny_checkpoint(client, tiny_checkpoint, tmp_path):
    """The default entrypoint (`python -m jobs.batch --config {config}`) end to end: SUCCEEDED, readable logs,
    and every input row in the output exactly once; resubmitting the same spec starts nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 12
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(n)],
                             "prompt": [f"Prompt number {i}" for i in range(n)]}), tmp_path / "prompts.parquet")
    job = {"input": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"), "model": str(tiny_checkpoint),
           "prompt_column": "prompt", "id_column": "prompt_id", "sampling": {"max_tokens": 4},
           "num_replicas": 1, "replica_num_cpus": 0.5, "batch_size": 4, "model_cache_dir": str(tmp_path / "cache"),
           "device": "cpu"}
    spec = JobSpec(name="glm4-e2e-batch", job=job)
    sid = client.submit(spec)
    status = client.wait(sid, timeout_s=480, poll_s=2)
    logs = client.logs(sid)
    assert str(status) == "SUCCEEDED", f"job ended {status}; logs:\n{logs[-4000:]}"
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists() and (out / "manifest.json").exists(), sorted(p.name for p in out.iterdir())
    ids = pq.read_table(out / "data", columns=["prompt_id"]).column("prompt_id").to_pylist()
    assert sorted(ids) == sorted(f"p{i}" for i in range(n)), "every row exactly once"
    again = client.submit_with_result(spec)
    assert (again.submission_id, again.created) == (sid, False)
