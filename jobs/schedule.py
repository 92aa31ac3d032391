"""Scheduled batch jobs: definitions (`jobs/schedules/*.yaml`), validation, and tick arithmetic.

A schedule is a job-config template plus a cron expression in a time zone. Each tick renders the template with
the tick's date (`{date}` -> YYYY-MM-DD in the schedule's time zone; the output prefix must contain it) and becomes a
`JobSpec` whose submission id is `<name>-<UTC YYYYMMDD-HHMM>`. Re-running a tick therefore reuses the same
submission id and the same output prefix; a rerun of a failed tick resumes from the pipeline's checkpoint.

Where a run learns its tick (first match wins, see `resolve_tick`):
1. `--tick ISO` given explicitly (VM cron via `glm4-jobs submit-schedule`, the K8s CronJob launcher);
2. a name hint `<name>-<unix minutes>[-xxxxx]`: the RayJob child of a KubeRay (>= 1.7) RayCronJob is named
   `<name>-<unix minutes>` and its Ray submission id is that plus `-<5 random chars>`; a batch/v1 CronJob names its
   Jobs `<name>-<unix minutes>`. The parsed time must be a tick of the cron expression;
3. otherwise the latest tick at or before now (wrong if a run starts more than one period late).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from pydantic import Field, field_validator, model_validator

from jobs.submit import JobOptions, JobSpec, dump_yaml

DATE_PLACEHOLDER = "{date}"
SCHEDULE_ENV_VAR = "GLM4_SCHEDULE_YAML"
SCHEDULES_DIR = Path(__file__).resolve().parent / "schedules"


def _substitute(value: Any, date: str) -> Any:
    """Replace `{date}` in every string of a nested config (plain replace: other braces stay untouched)."""
    if isinstance(value, str):
        return value.replace(DATE_PLACEHOLDER, date)
    if isinstance(value, list):
        return [_substitute(v, date) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, date) for k, v in value.items()}
    return value


class Schedule(JobOptions):
    """A scheduled batch job. Extra keys are rejected; every tick renders to a validated `JobSpec`."""

    name: str = Field(
        pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        max_length=30,
        description="DNS label, <= 30 chars: RayCronJob names allow 36, and '<name>-YYYYMMDD-HHMM-a<attempt>' "
        "must fit KubeRay's 47-char RayJob limit.",
    )
    description: str = Field(default="", description="What the job produces and for whom.")
    cron: str = Field(description="Standard 5-field cron expression (minute hour day-of-month month day-of-week).")
    time_zone: str = Field(default="Etc/UTC", description="IANA time zone the cron expression and {date} use.")
    suspend: bool = Field(default=False, description="Rendered into the RayCronJob/CronJob: no new ticks while true.")
    job: dict[str, Any] = Field(
        description="Batch job config template (pipeline.config.BatchJobConfig fields). '{date}' is replaced by "
        "the tick's date; the output prefix must contain it so every tick writes (and resumes) its own prefix."
    )

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, v: str) -> str:
        if len(v.split()) != 5 or not croniter.is_valid(v):
            raise ValueError(f"cron {v!r} is not a valid 5-field cron expression (no seconds, no macros, no TZ=)")
        return v

    @field_validator("time_zone")
    @classmethod
    def _check_tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {v!r}") from None
        return v

    @model_validator(mode="after")
    def _check_template(self) -> Schedule:
        if DATE_PLACEHOLDER not in str(self.job.get("output", "")):
            raise ValueError(f"job.output must contain {DATE_PLACEHOLDER} (one output prefix per tick)")
        self.job_spec(self.latest_tick(datetime(2026, 1, 1, tzinfo=timezone.utc)))  # validates the rendered config
        return self

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def is_tick(self, t: datetime) -> bool:
        return t.second == 0 and t.microsecond == 0 and croniter.match(self.cron, t.astimezone(self.tz))

    def latest_tick(self, now: datetime | None = None) -> datetime:
        """The last tick at or before `now` (in the schedule's time zone)."""
        now = (now or datetime.now(timezone.utc)).astimezone(self.tz)
        return croniter(self.cron, now + timedelta(seconds=1)).get_prev(datetime)

    def next_tick(self, after: datetime) -> datetime:
        return croniter(self.cron, after.astimezone(self.tz)).get_next(datetime)

    def render_job(self, tick: datetime) -> dict[str, Any]:
        return _substitute(self.job, tick.astimezone(self.tz).date().isoformat())

    def job_spec(self, tick: datetime, attempt: int = 1) -> JobSpec:
        options = self.model_dump(include=set(JobOptions.model_fields))
        return JobSpec(name=self.name, job=self.render_job(tick), scheduled_time=tick.astimezone(self.tz),
                       attempt=attempt, **options)

    def tick_from_name(self, hint: str) -> datetime | None:
        """Tick encoded in a K8s child name `<name>-<unix minutes>` (optionally `-<5 chars>` after it)."""
        m = re.fullmatch(rf"{re.escape(self.name)}-(\d{{7,}})(?:-[a-z0-9]{{5}})?", hint or "")
        if not m:
            return None
        t = datetime.fromtimestamp(int(m.group(1)) * 60, tz=timezone.utc)
        return t.astimezone(self.tz) if self.is_tick(t) else None

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        first = [k for k in ("name", "description", "cron", "time_zone", "suspend", "job") if k in data]
        return dump_yaml({**{k: data[k] for k in first}, **data})


def parse_tick(schedule: Schedule, value: str) -> datetime:
    """An explicit `--tick` (ISO 8601 with offset); it must be a tick of the schedule."""
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if t.utcoffset() is None:
        raise ValueError(f"tick {value!r} needs a UTC offset, e.g. 2026-11-28T02:00:00+00:00")
    if not schedule.is_tick(t):
        raise ValueError(f"{value} is not a tick of {schedule.name} ({schedule.cron!r} in {schedule.time_zone})")
    return t.astimezone(schedule.tz)


def resolve_tick(schedule: Schedule, tick: str | None = None, hints: Iterable[str] = (),
                 now: datetime | None = None) -> tuple[datetime, str]:
    """(tick, how it was found); see the module docstring for the order."""
    if tick and tick != "auto":
        return parse_tick(schedule, tick), "explicit --tick"
    for hint in hints:
        if hint and (t := schedule.tick_from_name(hint)) is not None:
            return t, f"name {hint}"
    return schedule.latest_tick(now), "latest tick before now"


def driver_name_hints() -> list[str]:
    """Names a driver can see that may encode its tick: the Ray submission id (from the job config Ray passes to
    the driver) and the K8s job name (downward API `GLM4_K8S_JOB_NAME`)."""
    hints = []
    with_cfg = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if with_cfg:
        try:
            sid = (json.loads(with_cfg).get("metadata") or {}).get("job_submission_id")
        except ValueError:
            sid = None
        if sid:
            hints.append(sid)
    if os.environ.get("GLM4_K8S_JOB_NAME"):
        hints.append(os.environ["GLM4_K8S_JOB_NAME"])
    return hints


def load_schedule(source: str | os.PathLike[str]) -> Schedule:
    """Load from a YAML file path."""
    with open(source) as f:
        return schedule_from_yaml(f.read(), str(source))


def schedule_from_yaml(text: str, where: str = "<inline>") -> Schedule:
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a schedule must be a mapping, got {type(data).__name__}")
    return Schedule.model_validate(data)


def load_schedules(directory: str | os.PathLike[str] = SCHEDULES_DIR) -> list[Schedule]:
    """Every `*.yaml` in `directory`, validated; names must be unique."""
    schedules = [load_schedule(p) for p in sorted(Path(directory).glob("*.yaml"))]
    names = [s.name for s in schedules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate schedule names in {directory}: {dupes}")
    return schedules
