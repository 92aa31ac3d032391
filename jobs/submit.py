"""Typed, idempotent job submission over the Ray Jobs API.

A `JobSpec` is one logical batch run: the pipeline's job config (`pipeline.config.BatchJobConfig`) plus the Ray
job options (runtime env, entrypoint resources, metadata). Its submission id is deterministic, so submitting the
same logical run twice never starts two jobs::

    from jobs.submit import GLM4JobClient, JobSpec

    spec = JobSpec(name="glm4-adhoc", job={"input": "s3://b/in/", "output": "s3://b/out/run1/", ...})
    client = GLM4JobClient("http://head:8265")           # fails fast (ClusterUnreachableError) if unreachable
    sid = client.submit(spec)                             # same spec again -> same id, no second job
    print(client.wait(sid, timeout_s=3600), client.logs(sid))

The job config travels inline: it is put, as YAML, into the job's runtime env (`GLM4_JOB_CONFIG_YAML`), and the
entrypoint `python -m jobs.cli run-with-config -- python -m jobs.batch --config {config}` writes it to a file on the
driver's node and execs the batch CLI on it. Nothing has to be uploaded and the config is visible in the job info.

Address resolution differs from Ray on purpose: `JobSubmissionClient` lets `RAY_API_SERVER_ADDRESS` /
`RAY_ADDRESS` override its `address` argument (inside a Ray job `RAY_ADDRESS` is the GCS address, not a dashboard).
Here an explicit address always wins; the env vars are only a fallback, and the address used is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:  # imported lazily at run time: `ray.job_submission` is not needed to build or validate specs
    from ray.job_submission import JobDetails, JobStatus

logger = logging.getLogger(__name__)

CONFIG_ENV_VAR = "GLM4_JOB_CONFIG_YAML"
CONFIG_PLACEHOLDER = "{config}"
DEFAULT_COMMAND = ("python", "-m", "jobs.batch", "--config", CONFIG_PLACEHOLDER)
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's precedence order
METADATA_PREFIX = "glm4_"
MAX_NAME_IN_ID = 30  # "<name>-YYYYMMDD-HHMM-a<n>" stays within KubeRay's 47-char RayJob name limit
_TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class ClusterUnreachableError(ConnectionError):
    """The Ray dashboard (Jobs API) at `address` did not answer in time, or is not a Ray dashboard."""

    def __init__(self, address: str, reason: str, source: str = "argument") -> None:
        self.address, self.reason, self.source = address, reason, source
        super().__init__(
            f"Ray cluster unreachable at {address} (address from {source}): {reason}. The address must be the "
            f"dashboard URL of the head node, e.g. http://HEAD:8265 (not the GCS port 6379)."
        )


class JobNotFoundError(LookupError):
    """No job with this submission id exists on the cluster."""


class JobWaitTimeout(TimeoutError):
    """`wait`/`tail_logs` gave up before the job reached a terminal state."""

    def __init__(self, submission_id: str, timeout_s: float, last_status: str | None) -> None:
        self.submission_id, self.last_status = submission_id, last_status
        super().__init__(f"job {submission_id} not finished after {timeout_s:.0f}s (last status {last_status})")


class JobSubmissionError(RuntimeError):
    """The cluster refused the submission (other than 'already exists', which is success)."""


# --------------------------------------------------------------------------------------------- spec


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks (embedded YAML stays readable in manifests); no line folding."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ReadableDumper.add_representer(str, _str_representer)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_ReadableDumper, sort_keys=False, width=120, allow_unicode=True)


def validate_job_config(job: Mapping[str, Any]) -> Any | None:
    """Validate `job` as `pipeline.config.BatchJobConfig`; returns the model, or None while that module is absent."""
    try:
        from pipeline.config import BatchJobConfig
    except ModuleNotFoundError as e:
        if e.name not in ("pipeline.config", "pipeline"):
            raise
        logger.debug("pipeline.config not importable yet; job config accepted unvalidated")
        return None
    return BatchJobConfig.model_validate(job)


def sanitize_name(name: str) -> str:
    """Lower-case DNS-label form of a job name: [a-z0-9-], starts with a letter, at most 30 chars."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = f"j-{s}".rstrip("-")
    return s[:MAX_NAME_IN_ID].rstrip("-")


def submission_id_for(name: str, scheduled_time: datetime, attempt: int = 1) -> str:
    """Submission id of a scheduled run: `<sanitized name>-<UTC YYYYMMDD-HHMM>[-a<attempt>]`."""
    tick = scheduled_time.astimezone(timezone.utc).strftime("%Y%m%d-%H%M")
    return f"{sanitize_name(name)}-{tick}" + (f"-a{attempt}" if attempt > 1 else "")


class JobOptions(BaseModel):
    """Ray job options shared by one-off specs (`JobSpec`) and schedules (`jobs.schedule.Schedule`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: list[str] | None = Field(
        default=None,
        description="Program the driver runs once the config file is written; '{config}' in an argument is "
        "replaced by the file's path. Default: python -m jobs.batch --config {config}.",
    )
    runtime_env: dict[str, Any] | None = Field(
        default=None,
        description="Ray runtime env of the job (use it for env_vars; bake code and dependencies into the image). "
        f"Only Ray's known runtime_env keys are accepted; env var {CONFIG_ENV_VAR} is reserved.",
    )
    entrypoint_num_cpus: float | None = Field(
        default=None, ge=0, description="CPUs reserved for the driver process only (not for its tasks/actors)."
    )
    entrypoint_num_gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs reserved for the driver only. Leave unset: the engine actors reserve their own GPUs, and "
        "a driver asking for a GPU on a cluster without a free one stays PENDING forever.",
    )
    entrypoint_resources: dict[str, float] | None = Field(
        default=None, description="Custom resources reserved for the driver (e.g. to pin it to a node type)."
    )
    entrypoint_memory: int | None = Field(
        default=None,
        ge=0,
        description="Memory in bytes reserved for the driver (Jobs API only: RayJob has no such field).",
    )
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description=f"Free-form string labels stored with the job. Keys starting with '{METADATA_PREFIX}' are "
        "reserved (the client adds name, spec hash, scheduled time, attempt, output). Not part of the spec hash.",
    )

    @field_validator("command")
    @classmethod
    def _check_command(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not all(isinstance(a, str) and a for a in v)):
            raise ValueError("command must be a non-empty list of non-empty strings")
        return v

    @field_validator("runtime_env")
    @classmethod
    def _check_runtime_env(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        from ray.runtime_env import RuntimeEnv  # light import; validates field types without a cluster

        unknown = sorted(set(v) - set(RuntimeEnv.known_fields))
        if unknown:  # Ray itself would treat these as plugin names and ignore typos silently
            raise ValueError(f"unknown runtime_env keys {unknown}; known: {sorted(RuntimeEnv.known_fields)}")
        if CONFIG_ENV_VAR in (v.get("env_vars") or {}):
            raise ValueError(f"runtime_env.env_vars.{CONFIG_ENV_VAR} is reserved for the job config")
        try:
            RuntimeEnv(**v)
        except (TypeError, ValueError) as e:  # pydantic reports only ValueError/AssertionError as field errors
            raise ValueError(f"invalid runtime_env: {e}") from None
        return v

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, v: dict[str, str]) -> dict[str, str]:
        reserved = [k for k in v if k.startswith(METADATA_PREFIX)]
        if reserved:
            raise ValueError(f"metadata keys {reserved} use the reserved prefix '{METADATA_PREFIX}'")
        return v


class JobSpec(JobOptions):
    """One logical batch run. Validation (including the job config) happens at construction, before any I/O."""

    name: str = Field(
        min_length=1, max_length=63, description="Logical job name; its sanitized form starts the submission id."
    )
    job: dict[str, Any] = Field(
        description="The batch job config (validated as pipeline.config.BatchJobConfig), written to the YAML file "
        "that `python -m jobs.batch --config` reads."
    )
    scheduled_time: datetime | None = Field(
        default=None,
        description="Scheduled time of the run (timezone-aware). If set, the submission id is "
        "<name>-<UTC YYYYMMDD-HHMM>; otherwise it is <name>-<12 hex chars of the spec hash>.",
    )
    attempt: int = Field(
        default=1,
        ge=1,
        description="Bump to re-run a logical run whose earlier attempt FAILED or was STOPPED (Ray never reuses a "
        "submission id). Same job config and output prefix, so the pipeline resumes from its checkpoint.",
    )
    submission_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="Explicit submission id; overrides the derived one (you then own its idempotency).",
    )

    @field_validator("job")
    @classmethod
    def _check_job(cls, v: dict[str, Any]) -> dict[str, Any]:
        validate_job_config(v)  # raises pydantic.ValidationError on a bad config
        return v

    @field_validator("scheduled_time")
    @classmethod
    def _check_scheduled_time(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.utcoffset() is None:
            raise ValueError("scheduled_time must be timezone-aware (e.g. 2026-11-28T02:00:00+00:00)")
        return v

    @model_validator(mode="after")
    def _check_name(self) -> JobSpec:
        if not sanitize_name(self.name):
            raise ValueError(f"name {self.name!r} has no usable characters")
        return self

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> JobSpec:
        with open(path) as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of JobSpec fields, got {type(data).__name__}")
        return cls.model_validate(data)

    def spec_hash(self) -> str:
        """sha256 over everything that changes what runs (metadata, submission_id and attempt excluded). The job
        config is normalized through BatchJobConfig when available (`exclude_unset`: defaults that depend on the
        submitting machine's environment, like the model cache dir, must not change the id)."""
        model = validate_job_config(self.job)
        job = model.model_dump(mode="json", exclude_unset=True) if model is not None else self.job
        body = self.model_dump(mode="json", exclude={"metadata", "submission_id", "job", "attempt"})
        blob = json.dumps({"spec": body, "job": job}, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def effective_submission_id(self) -> str:
        if self.submission_id:
            return self.submission_id
        if self.scheduled_time is not None:
            return submission_id_for(self.name, self.scheduled_time, self.attempt)
        return f"{sanitize_name(self.name)}-{self.spec_hash()[:12]}" + (
            f"-a{self.attempt}" if self.attempt > 1 else ""
        )

    def config_yaml(self) -> str:
        return dump_yaml(self.job)

    def entrypoint(self) -> str:
        return shlex.join(["python", "-m", "jobs.cli", "run-with-config", "--", *(self.command or DEFAULT_COMMAND)])

    def full_runtime_env(self) -> dict[str, Any]:
        env = copy.deepcopy(self.runtime_env or {})
        env["env_vars"] = {**(env.get("env_vars") or {}), CONFIG_ENV_VAR: self.config_yaml()}
        return env

    def full_metadata(self) -> dict[str, str]:
        md = dict(self.metadata)
        md[f"{METADATA_PREFIX}name"] = self.name
        md[f"{METADATA_PREFIX}spec_hash"] = self.spec_hash()
        md[f"{METADATA_PREFIX}attempt"] = str(self.attempt)
        if self.scheduled_time is not None:
            md[f"{METADATA_PREFIX}scheduled_time"] = self.scheduled_time.astimezone(timezone.utc).isoformat()
        if isinstance(self.job.get("output"), str):
            md[f"{METADATA_PREFIX}output"] = self.job["output"]
        return md

    def submit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `JobSubmissionClient.submit_job` (None values dropped)."""
        kw = dict(
            entrypoint=self.entrypoint(),
            submission_id=self.effective_submission_id,
            runtime_env=self.full_runtime_env(),
            metadata=self.full_metadata(),
            entrypoint_num_cpus=self.entrypoint_num_cpus,
            entrypoint_num_gpus=self.entrypoint_num_gpus,
            entrypoint_memory=self.entrypoint_memory,
            entrypoint_resources=self.entrypoint_resources,
        )
        return {k: v for k, v in kw.items() if v is not None}


# ------------------------------------------------------------------------------------------- client


def resolve_address(address: str | None) -> tuple[str, str]:
    """(dashboard URL, where it came from). Explicit argument > RAY_API_SERVER_ADDRESS > RAY_ADDRESS > default."""
    source = "argument"
    if address is None:
        source, address = next(
            ((f"env {k}", os.environ[k]) for k in ADDRESS_ENV_VARS if os.environ.get(k)), ("default", DEFAULT_ADDRESS)
        )
    else:
        for k in ADDRESS_ENV_VARS:
            if os.environ.get(k) and os.environ[k].rstrip("/") != address.rstrip("/"):
                logger.warning("ignoring %s=%s: the explicit address %s wins", k, os.environ[k], address)
    if not re.match(r"^https?://[^/\s]+", address):
        raise ValueError(
            f"address {address!r} (from {source}) is not a dashboard URL; use http(s)://HEAD:8265 "
            "(GCS addresses like HOST:6379, 'auto' and ray:// addresses are not accepted)"
        )
    return address.rstrip("/"), source


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _address_env_masked() -> Iterator[None]:
    """Hide RAY_API_SERVER_ADDRESS/RAY_ADDRESS while Ray's client resolves its address (it prefers the env)."""
    with _ENV_LOCK:
        saved = {k: os.environ.pop(k) for k in ADDRESS_ENV_VARS if k in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def probe_dashboard(url: str, timeout_s: float, headers: Mapping[str, str] | None = None, verify: Any = True,
                    source: str = "argument") -> str:
    """GET <url>/api/version within `timeout_s` (connect and read); returns the cluster's Ray version."""
    import requests

    try:
        r = requests.get(f"{url}/api/version", timeout=(timeout_s, timeout_s), headers=dict(headers or {}),
                         verify=verify)
    except requests.exceptions.Timeout as e:
        raise ClusterUnreachableError(url, f"no answer within {timeout_s:g}s ({type(e).__name__})", source) from None
    except requests.exceptions.RequestException as e:
        raise ClusterUnreachableError(url, f"{type(e).__name__}: {e}", source) from None
    if r.status_code in (401, 403):
        return "unknown"  # reachable; the SDK raises its own AuthenticationError with the fix in its message
    if r.status_code != 200:
        raise ClusterUnreachableError(url, f"/api/version answered HTTP {r.status_code}: not a Ray dashboard", source)
    try:
        return str(r.json()["ray_version"])
    except (ValueError, KeyError, TypeError):
        raise ClusterUnreachableError(url, "/api/version did not return a Ray version: not a Ray dashboard",
                                      source) from None


def _bounded_sdk_class(connect_s: float, read_s: float) -> type:
    """JobSubmissionClient whose HTTP calls all carry a timeout (Ray's own calls have none, so a silent
    server hangs them forever). `_do_request` is private API; Ray is pinned to 2.60.0 in pyproject."""
    from ray.job_submission import JobSubmissionClient

    class _BoundedJobSubmissionClient(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any):  # type: ignore[override]
            kwargs.setdefault("timeout", (connect_s, read_s))
            return super()._do_request(method, endpoint, **kwargs)

    return _BoundedJobSubmissionClient


@dataclass(frozen=True)
class SubmitResult:
    submission_id: str
    created: bool  # False: the run already existed (retried submit) and nothing new was started
    status: str


class GLM4JobClient:
    """Typed facade over `ray.job_submission.JobSubmissionClient`.

    Construction resolves the address (see module doc), probes `<address>/api/version` with `timeout_s` and raises
    `ClusterUnreachableError` naming the address if it does not answer. Every later HTTP call is bounded too
    (`timeout_s` to connect, `request_timeout_s` to read).
    """

    def __init__(self, address: str | None = None, timeout_s: float = 10.0, headers: Mapping[str, str] | None = None,
                 *, verify: bool | str = True, request_timeout_s: float = 120.0) -> None:
        self.address, self.address_source = resolve_address(address)
        self.timeout_s = timeout_s
        version = probe_dashboard(self.address, timeout_s, headers, verify, self.address_source)
        logger.info("Ray Jobs API at %s (from %s), Ray %s", self.address, self.address_source, version)
        import ray

        if version not in ("unknown", ray.__version__):
            logger.warning("cluster runs Ray %s but this client has %s; pin the same version", version,
                           ray.__version__)
        cls = _bounded_sdk_class(timeout_s, request_timeout_s)
        with _address_env_masked():
            self._sdk = self._guard(lambda: cls(self.address, headers=dict(headers or {}), verify=verify))

    @classmethod
    def from_sdk(cls, sdk: Any, address: str = "http://injected") -> GLM4JobClient:
        """Wrap an existing (or fake) JobSubmissionClient-like object; used by tests."""
        self = cls.__new__(cls)
        self.address, self.address_source, self.timeout_s, self._sdk = address, "injected", 10.0, sdk
        return self

    def _guard(self, fn):
        import requests

        try:
            return fn()
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            raise ClusterUnreachableError(self.address, f"{type(e).__name__}: {e}", self.address_source) from None
        except ConnectionError as e:  # Ray re-raises requests' ConnectionError as the builtin one
            if isinstance(e, ClusterUnreachableError):
                raise
            raise ClusterUnreachableError(self.address, str(e), self.address_source) from None

    # -- queries
    def info(self, submission_id: str) -> JobDetails:
        try:
            return self._guard(lambda: self._sdk.get_job_info(submission_id))
        except RuntimeError as e:
            if "404" in str(e) or "does not exist" in str(e):
                raise JobNotFoundError(f"no job {submission_id!r} on {self.address}") from None
            raise

    def _find(self, submission_id: str) -> JobDetails | None:
        try:
            return self.info(submission_id)
        except JobNotFoundError:
            return None

    def status(self, submission_id: str) -> JobStatus:
        return self.info(submission_id).status

    def logs(self, submission_id: str) -> str:
        self.info(submission_id)  # a clear JobNotFoundError instead of a bare HTTP error
        return self._guard(lambda: self._sdk.get_job_logs(submission_id))

    def list(self, name: str | None = None) -> list[JobDetails]:
        """All jobs on the cluster, or only those submitted from a JobSpec with this `name`."""
        jobs = self._guard(self._sdk.list_jobs)
        if name is not None:
            jobs = [j for j in jobs if (j.metadata or {}).get(f"{METADATA_PREFIX}name") == name]
        return sorted(jobs, key=lambda j: j.start_time or 0)

    # -- actions
    def submit(self, spec: JobSpec | Mapping[str, Any]) -> str:
        """Submit once per logical run; returns the submission id (also when the run already existed)."""
        return self.submit_with_result(spec).submission_id

    def submit_with_result(self, spec: JobSpec | Mapping[str, Any], *, agent_wait_s: float = 30.0) -> SubmitResult:
        if not isinstance(spec, JobSpec):
            spec = JobSpec.model_validate(dict(spec))  # validation before any cluster call
        kwargs = spec.submit_kwargs()
        sid = kwargs["submission_id"]
        existing = self._find(sid)
        if existing is not None:
            return self._existing(sid, existing.status)
        deadline, delay = time.monotonic() + agent_wait_s, 0.5
        while True:
            try:
                self._guard(lambda: self._sdk.submit_job(**kwargs))
                logger.info("submitted %s to %s", sid, self.address)
                return SubmitResult(sid, True, "PENDING")
            except RuntimeError as e:
                msg = str(e)
                if "already exists" in msg:  # lost a race with a concurrent submit of the same run
                    return self._existing(sid, self.status(sid))
                if "No available agent" in msg and time.monotonic() < deadline:
                    time.sleep(delay)  # a freshly started head needs a few seconds before it accepts jobs
                    delay = min(delay * 2, 5.0)
                    continue
                raise JobSubmissionError(f"submitting {sid} to {self.address} failed: {msg}") from None

    def _existing(self, sid: str, status: Any) -> SubmitResult:
        status = str(status)
        if status in ("FAILED", "STOPPED"):
            logger.warning("job %s already exists with status %s; not resubmitted. To retry this run, submit it "
                           "again with attempt=<n+1> (the pipeline resumes from its checkpoint).", sid, status)
        else:
            logger.info("job %s already exists (%s); not resubmitted", sid, status)
        return SubmitResult(sid, False, status)

    def stop(self, submission_id: str) -> bool:
        """Ask the cluster to stop the job (SIGTERM to the driver, then SIGKILL). False if it already ended."""
        self.info(submission_id)
        return bool(self._guard(lambda: self._sdk.stop_job(submission_id)))

    def wait(self, submission_id: str, timeout_s: float, poll_s: float = 1.0) -> JobStatus:
        """Poll until the job is terminal; returns its final status or raises `JobWaitTimeout`."""
        deadline, delay, status = time.monotonic() + timeout_s, min(0.25, poll_s), None
        while True:
            status = self.status(submission_id)
            if str(status) in _TERMINAL:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobWaitTimeout(submission_id, timeout_s, str(status))
            time.sleep(min(delay, left))
            delay = min(delay * 2, poll_s)

    def tail_logs(self, submission_id: str, timeout_s: float | None = None) -> Iterator[str]:
        """Yield log chunks as the driver writes them (Ray's websocket tail); ends when the job ends."""
        self.info(submission_id)
        loop = asyncio.new_event_loop()
        agen = self._sdk.tail_job_logs(submission_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise JobWaitTimeout(submission_id, timeout_s or 0, None)
                try:
                    chunk = loop.run_until_complete(asyncio.wait_for(agen.__anext__(), left))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise JobWaitTimeout(submission_id, timeout_s or 0, None) from None
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(agen.aclose())
            loop.close()
