"""`glm4-jobs`: submit and manage GLM-4 batch jobs on a Ray cluster; render and run schedules.

Client side (talk to the Ray Jobs API at --address, default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, then
http://127.0.0.1:8265; an explicit --address always wins):
    glm4-jobs submit job.yaml [--wait]          JobSpec YAML -> submission id (idempotent)
    glm4-jobs submit-schedule nightly.yaml      submit the latest (or --tick) tick of a schedule (VM cron)
    glm4-jobs status|wait|logs|stop ID;  glm4-jobs list [--name N]
Rendering (no cluster):
    glm4-jobs render-schedules [--check]        jobs/schedules/*.yaml -> infra/schedules/*.yaml
    glm4-jobs render-rayjob job.yaml            JobSpec YAML -> RayJob manifest on stdout
    glm4-jobs render-rayjob --schedule F --tick ISO [--attempt 2]   one tick's RayJob (backfill, retry)
Inside a Ray job driver / a Kubernetes pod (used by generated entrypoints):
    run-with-config -- CMD...                   write $GLM4_JOB_CONFIG_YAML to a file, exec CMD ({config} = path)
    run-scheduled [--schedule F] -- CMD...      resolve the tick, render the schedule's config, exec CMD
    launch-rayjob --schedule F --rayjob-template F [--wait]   create this tick's RayJob (batch/v1 CronJob pod)

Exit codes: 0 ok, 1 job FAILED/STOPPED, 2 invalid input, 3 cluster unreachable, 4 timed out, 5 no such job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("glm4-jobs")

REPO_ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_JOB_FAILED, EXIT_INVALID, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_NOT_FOUND = 0, 1, 2, 3, 4, 5


def _client(args: argparse.Namespace):
    from jobs.submit import GLM4JobClient

    headers = json.loads(args.headers) if args.headers else None
    return GLM4JobClient(args.address, timeout_s=args.connect_timeout_s, headers=headers)


def _details(job: Any) -> dict[str, Any]:
    dump = getattr(job, "model_dump", None) or job.dict
    d = dump()
    d["status"] = str(d.get("status"))
    return {k: v for k, v in d.items() if k not in ("driver_info", "runtime_env")}


def _finish(client: Any, sid: str, args: argparse.Namespace) -> int:
    """Shared tail of submit/stop: optionally follow logs and/or wait for the final status."""
    if getattr(args, "follow", False):
        for chunk in client.tail_logs(sid, timeout_s=args.timeout_s):
            print(chunk, end="", flush=True)
    if getattr(args, "wait", False) or getattr(args, "follow", False):
        status = str(client.wait(sid, timeout_s=args.timeout_s))
        print(f"{sid}: {status}")
        return EXIT_OK if status == "SUCCEEDED" else EXIT_JOB_FAILED
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submit import JobSpec

    spec = JobSpec.from_yaml(args.spec)  # validated before any connection
    overrides = {k: v for k, v in (("scheduled_time", args.scheduled_time), ("attempt", args.attempt),
                                   ("submission_id", args.submission_id)) if v is not None}
    if overrides:
        spec = JobSpec.model_validate({**spec.model_dump(exclude_unset=True), **overrides})
    return _submit(spec, args)


def _submit(spec: Any, args: argparse.Namespace) -> int:
    client = _client(args)
    res = client.submit_with_result(spec)
    print(json.dumps({"submission_id": res.submission_id, "created": res.created, "status": res.status,
                      "address": client.address}))
    return _finish(client, res.submission_id, args)


def cmd_submit_schedule(args: argparse.Namespace) -> int:
    from jobs.schedule import load_schedule, resolve_tick

    sched = load_schedule(args.schedule)
    tick, how = resolve_tick(sched, args.tick)
    logger.info("schedule %s: tick %s (%s)", sched.name, tick.isoformat(), how)
    return _submit(sched.job_spec(tick, attempt=args.attempt or 1), args)


def cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(_details(_client(args).info(args.id)), default=str))
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    args.wait = True
    return _finish(_client(args), args.id, args)


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.follow:
        for chunk in client.tail_logs(args.id, timeout_s=args.timeout_s):
            print(chunk, end="", flush=True)
    else:
        print(client.logs(args.id), end="")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    client = _client(args)
    print(json.dumps({"submission_id": args.id, "stop_requested": client.stop(args.id)}))
    return _finish(client, args.id, args) if args.wait else EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    jobs = [_details(j) for j in _client(args).list(name=args.name)]
    if args.json:
        print(json.dumps(jobs, default=str))
    else:
        for j in jobs:
            name = (j.get("metadata") or {}).get("glm4_name", "-")
            print(f"{j.get('submission_id') or j.get('job_id')}\t{j['status']}\t{name}\t{j.get('start_time')}")
    return EXIT_OK


def cmd_render_schedules(args: argparse.Namespace) -> int:
    from jobs.kube import load_rayjob_template, render_schedule_files, write_or_check
    from jobs.schedule import load_schedules

    template = load_rayjob_template(args.rayjob_template)
    rel = os.path.relpath(args.rayjob_template, REPO_ROOT) if Path(args.rayjob_template).is_absolute() \
        else args.rayjob_template
    files = render_schedule_files(load_schedules(args.schedules_dir), template, rel)
    changed = write_or_check(files, args.out, check=args.check)
    for p in changed:
        print(("out of date: " if args.check else "wrote: ") + p)
    return EXIT_INVALID if (args.check and changed) else EXIT_OK


def cmd_render_rayjob(args: argparse.Namespace) -> int:
    from jobs.kube import load_rayjob_template, rayjob_from_spec
    from jobs.schedule import load_schedule, resolve_tick
    from jobs.submit import JobSpec, dump_yaml

    if args.schedule:  # one tick of a schedule (backfill, or a retry with --attempt 2)
        sched = load_schedule(args.schedule)
        spec = sched.job_spec(resolve_tick(sched, args.tick)[0], attempt=args.attempt or 1)
    elif args.spec:
        spec = JobSpec.from_yaml(args.spec)
    else:
        raise ValueError("give a JobSpec YAML or --schedule FILE")
    print(dump_yaml(rayjob_from_spec(spec, load_rayjob_template(args.rayjob_template))), end="")
    return EXIT_OK


def _exec_with_config(config_text: str, command: Sequence[str]) -> int:
    """Write the config to a private temp file and replace this process by `command` ({config} -> its path)."""
    from jobs.submit import CONFIG_PLACEHOLDER

    d = Path(tempfile.gettempdir()) / f"glm4-jobs-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="job-", suffix=".yaml", dir=d)
    with os.fdopen(fd, "w") as f:
        f.write(config_text)
    argv = [a.replace(CONFIG_PLACEHOLDER, path) for a in command]
    logger.info("config written to %s; exec %s", path, " ".join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)  # signals from `ray job stop` now reach the batch process directly
    return EXIT_OK  # not reached


def _command(args: argparse.Namespace, default: Sequence[str] | None = None) -> list[str]:
    from jobs.submit import DEFAULT_COMMAND

    cmd = list(args.command or [])
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    return cmd or list(default or DEFAULT_COMMAND)


def cmd_run_with_config(args: argparse.Namespace) -> int:
    from jobs.submit import CONFIG_ENV_VAR

    text = os.environ.get(CONFIG_ENV_VAR)
    if not text:
        logger.error("%s is not set: this command runs inside a job submitted by glm4-jobs", CONFIG_ENV_VAR)
        return EXIT_INVALID
    return _exec_with_config(text, _command(args))


def cmd_run_scheduled(args: argparse.Namespace) -> int:
    from jobs.schedule import SCHEDULE_ENV_VAR, driver_name_hints, resolve_tick, schedule_from_yaml

    text = Path(args.schedule).read_text() if args.schedule else os.environ.get(SCHEDULE_ENV_VAR)
    if not text:
        logger.error("no schedule: pass --schedule FILE or set %s", SCHEDULE_ENV_VAR)
        return EXIT_INVALID
    sched = schedule_from_yaml(text, args.schedule or SCHEDULE_ENV_VAR)
    tick, how = resolve_tick(sched, args.tick, driver_name_hints())
    latest = sched.latest_tick()
    if tick < latest:
        logger.warning("running tick %s although %s is the latest: a backfill or a late start", tick, latest)
    spec = sched.job_spec(tick)  # validates the rendered config
    logger.info("schedule %s: tick %s (%s); output %s", sched.name, tick.isoformat(), how, spec.job.get("output"))
    return _exec_with_config(spec.config_yaml(), _command(args, sched.command))


def cmd_launch_rayjob(args: argparse.Namespace) -> int:
    from jobs.kube import InClusterAPI, launch_rayjob, load_rayjob_template
    from jobs.schedule import driver_name_hints, load_schedule, resolve_tick

    sched = load_schedule(args.schedule)
    tick, how = resolve_tick(sched, args.tick, driver_name_hints())
    logger.info("schedule %s: tick %s (%s)", sched.name, tick.isoformat(), how)
    result = launch_rayjob(sched.job_spec(tick, attempt=args.attempt or 1), load_rayjob_template(args.rayjob_template),
                           InClusterAPI(), wait=args.wait)
    print(json.dumps({"schedule": sched.name, "tick": tick.isoformat(), "result": result}))
    return EXIT_JOB_FAILED if result in ("Failed", "ValidationFailed") else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm4-jobs", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--address", default=None, help="Ray dashboard URL http(s)://HEAD:8265 (wins over env vars)")
    conn.add_argument("--connect-timeout-s", type=float, default=10.0, help="fail if the dashboard does not answer")
    conn.add_argument("--headers", default=os.environ.get("RAY_JOB_HEADERS"), help="JSON HTTP headers (auth proxy)")
    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument("--wait", action="store_true", help="wait for the final status (exit 1 unless SUCCEEDED)")
    wait.add_argument("--follow", action="store_true", help="stream the logs, then wait")
    wait.add_argument("--timeout-s", type=float, default=24 * 3600.0, help="give up waiting after this long")

    s = sub.add_parser("submit", parents=[conn, wait], help="submit a JobSpec YAML (idempotent)")
    s.add_argument("spec")
    s.add_argument("--scheduled-time", default=None, help="ISO time with offset; id becomes <name>-<UTC time>")
    s.add_argument("--attempt", type=int, default=None, help="retry a FAILED/STOPPED run under a new id")
    s.add_argument("--submission-id", default=None, help="explicit submission id")
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("submit-schedule", parents=[conn, wait], help="submit one tick of a schedule")
    s.add_argument("schedule", help="schedule YAML (jobs/schedules/*.yaml)")
    s.add_argument("--tick", default="auto", help="ISO tick with offset, or 'auto' = latest tick before now")
    s.add_argument("--attempt", type=int, default=None)
    s.set_defaults(fn=cmd_submit_schedule)

    for name, fn, h in (("status", cmd_status, "job info as JSON"), ("wait", cmd_wait, "wait for the final status"),
                        ("logs", cmd_logs, "print (or --follow) the logs"), ("stop", cmd_stop, "stop a job")):
        s = sub.add_parser(name, parents=[conn], help=h)
        s.add_argument("id", help="submission id")
        s.add_argument("--timeout-s", type=float, default=24 * 3600.0)
        if name in ("logs",):
            s.add_argument("--follow", action="store_true")
        if name == "stop":
            s.add_argument("--wait", action="store_true")
        s.set_defaults(fn=fn)

    s = sub.add_parser("list", parents=[conn], help="list jobs")
    s.add_argument("--name", default=None, help="only jobs of this JobSpec/schedule name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("render-schedules", help="render schedules to RayCronJob and CronJob manifests")
    s.add_argument("--schedules-dir", default=str(REPO_ROOT / "jobs" / "schedules"))
    s.add_argument("--rayjob-template", default=str(REPO_ROOT / "infra" / "rayjob-batch.yaml"))
    s.add_argument("--out", default=str(REPO_ROOT / "infra" / "schedules"))
    s.add_argument("--check", action="store_true", help="exit 2 if the files on disk are out of date")
    s.set_defaults(fn=cmd_render_schedules)

    s = sub.add_parser("render-rayjob", help="print the RayJob for a JobSpec YAML or a schedule tick")
    s.add_argument("spec", nargs="?", default=None, help="JobSpec YAML")
    s.add_argument("--schedule", default=None, help="schedule YAML instead of a JobSpec")
    s.add_argument("--tick", default="auto", help="with --schedule: ISO tick with offset, or 'auto' (latest)")
    s.add_argument("--attempt", type=int, default=None, help="with --schedule: retry a failed tick")
    s.add_argument("--rayjob-template", default=str(REPO_ROOT / "infra" / "rayjob-batch.yaml"))
    s.set_defaults(fn=cmd_render_rayjob)

    s = sub.add_parser("run-with-config", help="(driver) write the inline config and exec the command")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(fn=cmd_run_with_config)

    s = sub.add_parser("run-scheduled", help="(driver) run the tick of a schedule")
    s.add_argument("--schedule", default=None, help="schedule YAML (default: $GLM4_SCHEDULE_YAML)")
    s.add_argument("--tick", default="auto")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(fn=cmd_run_scheduled)

    s = sub.add_parser("launch-rayjob", help="(CronJob pod) create this tick's RayJob")
    s.add_argument("--schedule", required=True)
    s.add_argument("--rayjob-template", required=True)
    s.add_argument("--tick", default="auto")
    s.add_argument("--attempt", type=int, default=None)
    s.add_argument("--wait", action="store_true", help="wait until the RayJob is Complete/Failed")
    s.set_defaults(fn=cmd_launch_rayjob)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pydantic import ValidationError

    from jobs.submit import ClusterUnreachableError, JobNotFoundError, JobSubmissionError, JobWaitTimeout

    try:
        return args.fn(args)
    except (ValidationError, ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"glm4-jobs: invalid input: {e}", file=sys.stderr)
        return EXIT_INVALID
    except ClusterUnreachableError as e:
        print(f"glm4-jobs: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except JobWaitTimeout as e:
        print(f"glm4-jobs: {e}", file=sys.stderr)
        return EXIT_TIMEOUT
    except JobNotFoundError as e:
        print(f"glm4-jobs: {e}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except JobSubmissionError as e:
        print(f"glm4-jobs: {e}", file=sys.stderr)
        return EXIT_JOB_FAILED


if __name__ == "__main__":
    sys.exit(main())
