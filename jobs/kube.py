"""Kubernetes renderings of job specs and schedules (KubeRay v1.7 CRDs), and the in-cluster RayJob launcher.

* `rayjob_from_spec`: a `JobSpec` as a `RayJob` (cluster spec taken from a template, e.g. infra/rayjob-batch.yaml).
  Every renderer refuses a `device: cuda` job whose replicas the template's GPU worker groups cannot hold
  (`check_cluster_fits_job`).
* `render_raycronjob`: a schedule as a KubeRay `RayCronJob` (KubeRay >= 1.7, alpha: the operator needs the feature
  gate `RayCronJob=true`, Helm `featureGates: [{name: RayCronJob, enabled: true}]`). Each tick's RayJob runs
  `python -m jobs.cli run-scheduled`, which finds its tick from its own name (see jobs/schedule.py).
* `render_cronjob_bundle`: for clusters without RayCronJob, a `batch/v1 CronJob` whose pod runs
  `python -m jobs.cli launch-rayjob`; that creates the tick's RayJob named `<name>-YYYYMMDD-HHMM` (AlreadyExists =
  already launched, so a retried launcher never starts a second run) and waits for it, so `concurrencyPolicy:
  Forbid` really prevents overlapping runs. Includes the ServiceAccount/Role/RoleBinding/ConfigMap it needs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from jobs.schedule import SCHEDULE_ENV_VAR, Schedule
from jobs.submit import DEFAULT_COMMAND, METADATA_PREFIX, JobSpec, dump_yaml

logger = logging.getLogger(__name__)

RAYJOB_NAME_MAX = 47
RAYCRONJOB_NAME_MAX = 36
_JOB_FIELDS = ("entrypoint", "jobId", "metadata", "runtimeEnvYAML", "entrypointNumCpus", "entrypointNumGpus",
               "entrypointResources")
_LAUNCH_DIR = "/etc/glm4"


def load_rayjob_template(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The RayJob document of a (possibly multi-document) YAML file."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict) and d.get("kind") == "RayJob"]
    if len(docs) != 1:
        raise ValueError(f"{path}: expected exactly one RayJob document, found {len(docs)}")
    return docs[0]


def _job_fields_from_options(opts: Any) -> dict[str, Any]:
    if opts.entrypoint_memory is not None:
        raise ValueError("entrypoint_memory has no RayJob field; reserve memory with entrypoint_resources instead")
    out: dict[str, Any] = {}
    if opts.entrypoint_num_cpus is not None:
        out["entrypointNumCpus"] = opts.entrypoint_num_cpus
    if opts.entrypoint_num_gpus is not None:
        out["entrypointNumGpus"] = opts.entrypoint_num_gpus
    if opts.entrypoint_resources:
        out["entrypointResources"] = json.dumps(opts.entrypoint_resources, sort_keys=True)  # a JSON string in the CRD
    return out


def _template_spec(template: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(template["spec"])
    for k in _JOB_FIELDS:
        spec.pop(k, None)
    return spec


def _pod_gpus(pod_template: dict[str, Any]) -> int:
    containers = (pod_template.get("spec") or {}).get("containers") or []
    return sum(int(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)) for c in containers)


def check_cluster_fits_job(job: dict[str, Any], template: dict[str, Any]) -> None:
    """A `device: cuda` job (the default) must be placeable on the template's cluster: some worker group's pods hold
    `tensor_parallel_size` GPUs (a replica's ranks share one pod, STRICT_PACK), and the groups' maxReplicas give at
    least `num_replicas` such replicas (the job waits for that many before reading a row). Otherwise the RayJob
    would sit with pending actors until its deadline. Templates selecting an existing cluster are not checked."""
    cluster = template.get("spec", {}).get("rayClusterSpec")
    if not cluster or job.get("device", "cuda") != "cuda":
        return
    tp, replicas = int(job.get("tensor_parallel_size", 1)), int(job.get("num_replicas", 1))
    groups = [(g.get("groupName", "?"), _pod_gpus(g.get("template") or {}),
               int(g.get("maxReplicas", 2**31 - 1)) * int(g.get("numOfHosts", 1)))
              for g in cluster.get("workerGroupSpecs") or []]
    capacity = sum((gpus // tp) * pods for _, gpus, pods in groups)
    if capacity < replicas:
        have = ", ".join(f"{n}: {pods} pods x {gpus} nvidia.com/gpu" for n, gpus, pods in groups) or "no worker groups"
        raise ValueError(f"the job asks for {replicas} GPU replicas of tensor_parallel_size {tp} (device: cuda), but "
                         f"the RayJob template's cluster holds at most {capacity} ({have})")


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "glm4-batch", "app.kubernetes.io/part-of": "glm4", "glm4/job-name": name}


def rayjob_from_spec(spec: JobSpec, template: dict[str, Any]) -> dict[str, Any]:
    """RayJob named after (and with jobId =) the spec's submission id."""
    check_cluster_fits_job(spec.job, template)
    sid = spec.effective_submission_id
    name = re.sub(r"[^a-z0-9-]", "-", sid.lower())
    if len(name) > RAYJOB_NAME_MAX or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise ValueError(f"RayJob name {name!r} (from submission id {sid!r}) must be a DNS label <= 47 chars")
    body = dict(entrypoint=spec.entrypoint(), jobId=sid, metadata=spec.full_metadata(),
                runtimeEnvYAML=dump_yaml(spec.full_runtime_env()),
                **_job_fields_from_options(spec), **_template_spec(template))
    meta = {"name": name, "labels": {**template.get("metadata", {}).get("labels", {}), **_labels(spec.name)}}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": body}


def render_raycronjob(schedule: Schedule, template: dict[str, Any]) -> dict[str, Any]:
    check_cluster_fits_job(schedule.job, template)
    rest = _template_spec(template)
    if "deletionStrategy" not in rest and not rest.get("shutdownAfterJobFinishes"):
        raise ValueError("the RayJob template needs a deletionStrategy: RayCronJob keeps every child otherwise")
    env = copy.deepcopy(schedule.runtime_env or {})
    env["env_vars"] = {**(env.get("env_vars") or {}), SCHEDULE_ENV_VAR: schedule.to_yaml()}
    command = schedule.command or list(DEFAULT_COMMAND)
    # No jobId: it would be the same for every tick. KubeRay names each tick's RayJob <name>-<unix minutes> and
    # its submission id <that>-<5 random chars>; `run-scheduled` reads the tick back from that id.
    body = dict(
        entrypoint=shlex.join(["python", "-m", "jobs.cli", "run-scheduled", "--", *command]),
        runtimeEnvYAML=dump_yaml(env),
        metadata={**schedule.metadata, f"{METADATA_PREFIX}name": schedule.name},
        **_job_fields_from_options(schedule),
        **rest,
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {"name": schedule.name, "labels": _labels(schedule.name)},
        "spec": {"schedule": schedule.cron, "timeZone": schedule.time_zone, "suspend": schedule.suspend,
                 "jobTemplate": body},
    }


def _head_image(template: dict[str, Any]) -> str:
    return template["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def render_cronjob_bundle(schedule: Schedule, template: dict[str, Any]) -> list[dict[str, Any]]:
    """ServiceAccount, Role, RoleBinding, ConfigMap and the CronJob that launches one RayJob per tick."""
    check_cluster_fits_job(schedule.job, template)
    n, labels = f"{schedule.name}-launcher", _labels(schedule.name)
    meta = {"name": n, "labels": labels}
    launcher = {
        "name": "launch",
        "image": _head_image(template),
        "command": ["python", "-m", "jobs.cli", "launch-rayjob", "--schedule", f"{_LAUNCH_DIR}/schedule.yaml",
                    "--rayjob-template", f"{_LAUNCH_DIR}/rayjob-template.yaml", "--wait"],
        # A CronJob names its Jobs <cronjob>-<scheduled unix minutes>: the launcher reads its tick from that.
        "env": [{"name": "GLM4_K8S_JOB_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['job-name']"}}}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "volumeMounts": [{"name": "launch-config", "mountPath": _LAUNCH_DIR, "readOnly": True}],
    }
    cronjob = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": schedule.name, "labels": labels},
        "spec": {
            "schedule": schedule.cron,
            "timeZone": schedule.time_zone,
            "suspend": schedule.suspend,
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 5,
            "jobTemplate": {"spec": {"backoffLimit": 3, "template": {
                "metadata": {"labels": labels},
                "spec": {"serviceAccountName": n, "restartPolicy": "Never", "containers": [launcher],
                         "volumes": [{"name": "launch-config", "configMap": {"name": n}}]},
            }}},
        },
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
         "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n},
         "subjects": [{"kind": "ServiceAccount", "name": n}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
         "data": {"schedule.yaml": schedule.to_yaml(), "rayjob-template.yaml": dump_yaml(template)}},
        cronjob,
    ]


def _dump(docs: list[dict[str, Any]], header: str) -> str:
    return header + "".join("---\n" + dump_yaml(d) for d in docs)


def render_schedule_files(schedules: list[Schedule], template: dict[str, Any], template_path: str) -> dict[str, str]:
    """{file name: text} for every schedule: `<name>.raycronjob.yaml` and `<name>.cronjob.yaml`."""
    out = {}
    for s in schedules:
        header = (f"# GENERATED by `glm4-jobs render-schedules` from jobs/schedules ({s.name}) and {template_path}."
                  "\n# Do not edit; edit the sources and re-render.\n")
        gate = "# Needs KubeRay >= 1.7 with the RayCronJob feature gate on.\n"
        out[f"{s.name}.raycronjob.yaml"] = _dump([render_raycronjob(s, template)], header + gate)
        out[f"{s.name}.cronjob.yaml"] = _dump(render_cronjob_bundle(s, template),
                                              header + "# For clusters without RayCronJob (any KubeRay >= 1.6).\n")
    return out


def write_or_check(files: dict[str, str], out_dir: str | os.PathLike[str], check: bool) -> list[str]:
    """Make `out_dir` hold exactly `files` (returns the paths changed); with `check` only list them."""
    out, changed = Path(out_dir), []
    for p in sorted(out.glob("*.yaml")) if out.is_dir() else []:
        if p.name not in files:  # a schedule that was removed or renamed
            changed.append(str(p))
            if not check:
                p.unlink()
    for name, text in sorted(files.items()):
        p = out / name
        if not p.exists() or p.read_text() != text:
            changed.append(str(p))
            if not check:
                out.mkdir(parents=True, exist_ok=True)
                p.write_text(text)
    return changed


# ----------------------------------------------------------------------------------- in-cluster launcher


class InClusterAPI:
    """Minimal Kubernetes API client from the pod's service account (no kubernetes package needed)."""

    SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")

    def __init__(self) -> None:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.base = f"https://{host}:{port}"
        self.namespace = (self.SA / "namespace").read_text().strip()
        self._token_path = self.SA / "token"

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        import requests

        headers = {"Authorization": f"Bearer {self._token_path.read_text().strip()}"}  # re-read: tokens rotate
        r = requests.request(method, self.base + path, json=body, headers=headers, verify=str(self.SA / "ca.crt"),
                             timeout=(10, 60))
        return r.status_code, (r.json() if r.content else {})


def launch_rayjob(spec: JobSpec, template: dict[str, Any], api: Any, *, wait: bool = False,
                  poll_s: float = 30.0) -> str:
    """Create the RayJob for `spec` unless it exists; with `wait`, block until it is Complete or Failed.
    Returns the final `jobDeploymentStatus` (or 'Created'/'Exists' without `wait`)."""
    manifest = rayjob_from_spec(spec, template)
    name, base = manifest["metadata"]["name"], f"/apis/ray.io/v1/namespaces/{api.namespace}/rayjobs"
    code, body = api.request("POST", base, manifest)
    if code == 409:
        logger.info("RayJob %s already exists: this tick was already launched", name)
        result = "Exists"
    elif code >= 300:
        raise RuntimeError(f"creating RayJob {name} failed: HTTP {code}: {body.get('message', body)}")
    else:
        logger.info("created RayJob %s (jobId %s)", name, spec.effective_submission_id)
        result = "Created"
    while wait:
        code, body = api.request("GET", f"{base}/{name}")
        if code >= 300:
            raise RuntimeError(f"reading RayJob {name} failed: HTTP {code}: {body.get('message', body)}")
        status = (body.get("status") or {}).get("jobDeploymentStatus", "")
        if status in ("Complete", "Failed", "ValidationFailed"):
            return status
        time.sleep(poll_s)
    return result
