"""Every manifest in infra/ and every rendered schedule, checked against the real schemas with unknown keys rejected.

* KubeRay resources: the openAPIV3Schema of the v1.7.0 CRDs in ../shared/kuberay-crds-v1.7.0, made strict
  (`additionalProperties: false` wherever a schema lists properties and does not preserve unknown fields: the API
  server prunes unknown fields silently, so a typo would be lost without an error), plus the CEL rules and the
  operator-side rules we depend on (name lengths, deletionStrategy exclusivity).
* Other Kubernetes kinds the schedule renderer emits (CronJob, RBAC, ConfigMap): a strict schema of the subset
  used, with the CronJob's pod template checked by the PodTemplateSpec schema embedded in the RayCluster CRD.
* Serve config: Ray's `ServeDeploySchema`, plus a walk that rejects keys its models do not declare (Serve itself
  accepts and ignores them).
* Cluster launcher: Ray's own ray-schema.json, made strict the same way.
* Entry points: every `python -m X` in the Dockerfile and manifests names a module that exists, and every
  `jobs.cli` command line parses.
* GPU fleet (issue 15): every GPU worker group requests nvidia.com/gpu; every batch job config we ship says
  `device: cuda` and fits its cluster; the model cache is writable for Ray's uid; the Serve API key comes from a
  Secret; the Dockerfile installs dependencies before it copies the code.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import shlex
import typing
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from jobs import cli
from jobs.kube import check_cluster_fits_job, load_rayjob_template, rayjob_from_spec, render_schedule_files
from jobs.schedule import SCHEDULE_ENV_VAR, Schedule, load_schedules
from jobs.submit import CONFIG_ENV_VAR, JobSpec

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds-v1.7.0"
RAY_VERSION = "2.60.0"
KUBERAY = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices", "RayCronJob": "raycronjobs"}
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47, "RayCronJob": 36}  # KubeRay utils/constant.go
NOT_MANIFESTS = {"serve-config.yaml", "cluster-launcher.yaml", "jobspec-example.yaml"}
RAY_UID = 1000  # the ray user of rayproject/ray images (and of ours)
GPU = "nvidia.com/gpu"
PACKAGES = ("glm4", "pipeline", "jobs")  # [tool.setuptools.packages.find] in pyproject.toml
# Modules/files other engineers are still writing; a missing one skips (not fails) the entry-point checks.
# The lead removes an entry once it has landed.
PENDING: set[str] = set()


# ----------------------------------------------------------------------------------------------- schemas


def strict(schema: dict) -> dict:
    """Copy of an OpenAPI/JSON schema that rejects properties it does not list."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = strict(s[key])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            s[key] = [strict(x) for x in s[key]]
    for key in ("patternProperties", "definitions", "$defs"):
        if key in s:
            s[key] = {k: strict(v) for k, v in s[key].items()}
    return s


@cache
def crd_schema(kind: str) -> dict:
    path = CRD_DIR / f"ray.io_{KUBERAY[kind]}.yaml"
    if not path.exists():
        pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (CI provides ../shared next to the checkout)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1-1.4 MB each
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])


def schema_errors(schema: dict, doc: dict) -> list[str]:
    v = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(doc)]


def metadata_schema(max_name: int) -> dict:
    str_map = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "maxLength": max_name, "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"}, "labels": str_map, "annotations": str_map}}


@cache
def pod_template_schema() -> dict:
    """PodTemplateSpec as KubeRay's CRD embeds it (full core/v1 schema), strict."""
    return crd_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]


def k8s_schema(kind: str) -> dict:
    """Strict schema of the subset of core Kubernetes kinds the schedule renderer emits."""
    strs = {"type": "array", "items": {"type": "string"}}

    def obj(props: dict, required: tuple = ()) -> dict:
        return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}

    base = {"apiVersion": {"type": "string"}, "kind": {"const": kind}, "metadata": metadata_schema(63)}
    extra = {
        "ServiceAccount": {},
        "Role": {"rules": {"type": "array", "items": obj({"apiGroups": strs, "resources": strs, "verbs": {
            "type": "array", "items": {"enum": ["get", "list", "watch", "create", "update", "patch", "delete"]}}},
            ("apiGroups", "resources", "verbs"))}},
        "RoleBinding": {"roleRef": obj({"apiGroup": {"type": "string"}, "kind": {"enum": ["Role", "ClusterRole"]},
                                        "name": {"type": "string"}}, ("apiGroup", "kind", "name")),
                        "subjects": {"type": "array", "items": obj({"kind": {"const": "ServiceAccount"},
                                                                    "name": {"type": "string"},
                                                                    "namespace": {"type": "string"}},
                                                                   ("kind", "name"))}},
        "ConfigMap": {"data": {"type": "object", "additionalProperties": {"type": "string"}}},
        "CronJob": {"spec": obj({
            "schedule": {"type": "string"}, "timeZone": {"type": "string"}, "suspend": {"type": "boolean"},
            "concurrencyPolicy": {"enum": ["Allow", "Forbid", "Replace"]},
            "startingDeadlineSeconds": {"type": "integer", "minimum": 0},
            "successfulJobsHistoryLimit": {"type": "integer", "minimum": 0},
            "failedJobsHistoryLimit": {"type": "integer", "minimum": 0},
            "jobTemplate": obj({"metadata": {"type": "object"}, "spec": obj({
                "backoffLimit": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "template": pod_template_schema()}, ("template",))}, ("spec",)),
        }, ("schedule", "jobTemplate"))},
    }[kind]
    api = {"ServiceAccount": "v1", "ConfigMap": "v1", "CronJob": "batch/v1"}.get(kind, "rbac.authorization.k8s.io/v1")
    base["apiVersion"] = {"const": api}
    return obj({**base, **extra}, ("apiVersion", "kind", "metadata"))


# ----------------------------------------------------------------------------------------- collections


def yaml_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: every YAML document must be a mapping"
    return docs


def manifest_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*.yaml") if p.name not in NOT_MANIFESTS)


def template() -> dict:
    return load_rayjob_template(INFRA / "rayjob-batch.yaml")


def rendered_schedules() -> dict[str, list[dict]]:
    files = render_schedule_files(load_schedules(), template(), "infra/rayjob-batch.yaml")
    return {name: [d for d in yaml.safe_load_all(text) if d] for name, text in files.items()}


def all_resources() -> list[tuple[str, dict]]:
    """(where, resource) for every document of every manifest on disk, every rendered schedule, the RayJob each
    schedule's launcher would create, and the RayJob of the JobSpec example."""
    out = [(f"{p.relative_to(REPO)}#{i}", d) for p in manifest_files() for i, d in enumerate(yaml_docs(p))]
    out += [(f"rendered {n}#{i}", d) for n, docs in rendered_schedules().items() for i, d in enumerate(docs)]
    tick = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    out += [(f"launcher RayJob of {s.name}", rayjob_from_spec(s.job_spec(s.latest_tick(tick)), template()))
            for s in load_schedules()]
    example = JobSpec.from_yaml(INFRA / "jobspec-example.yaml")
    out.append(("RayJob of infra/jobspec-example.yaml", rayjob_from_spec(example, template())))
    return out


def ray_cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return [c for c in (spec, spec.get("rayClusterSpec"), spec.get("rayClusterConfig"),
                        spec.get("jobTemplate", {}).get("rayClusterSpec")) if c and "headGroupSpec" in c]


def rayjob_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayJob":
        return [doc["spec"]]
    return [doc["spec"]["jobTemplate"]] if doc["kind"] == "RayCronJob" else []


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def validate_batch_config(cfg: dict):
    from pipeline.config import BatchJobConfig

    cfg = dict(cfg)
    return BatchJobConfig.model_validate(cfg)


def configmap_rayjob_templates() -> list[tuple[str, dict]]:
    """The RayJob templates the CronJob launchers carry in their ConfigMaps (they create each tick's RayJob)."""
    return [(f"{where} rayjob-template.yaml", yaml.safe_load(d["data"]["rayjob-template.yaml"]))
            for where, d in all_resources() if d["kind"] == "ConfigMap" and "rayjob-template.yaml" in d["data"]]


def all_clusters() -> list[tuple[str, dict]]:
    """(where, Ray cluster spec) of every KubeRay resource, rendered RayJob and launcher template."""
    docs = [r for r in all_resources() if r[1]["kind"] in KUBERAY] + configmap_rayjob_templates()
    return [(where, c) for where, d in docs for c in ray_cluster_specs(d)]


def pod_gpus(pod: dict, kind: str = "limits") -> int:
    return sum(int(c.get("resources", {}).get(kind, {}).get(GPU, 0)) for c in pod["spec"]["containers"])


def is_gpu_group(group: dict) -> bool:
    """A worker group meant for GPU nodes: named so, tolerating the GPU taint, selecting GPU nodes, or asking."""
    pod = group["template"]["spec"]
    return ("gpu" in group["groupName"].lower() or pod_gpus(group["template"]) > 0
            or any(t.get("key") == GPU for t in pod.get("tolerations", []))
            or any(k.startswith("nvidia.com/") for k in pod.get("nodeSelector", {})))


def batch_job_configs() -> list[tuple[str, dict, list[dict]]]:
    """(where, raw batch job config, the Ray clusters it may run on) for every config we ship: the sources
    (jobs/schedules, the JobSpec example) and every copy embedded in a manifest, a rendered schedule, a launcher's
    ConfigMap, or a RayJob rendered from a spec."""
    shared = ray_cluster_specs(yaml_docs(INFRA / "raycluster.yaml")[0])
    templ = ray_cluster_specs(template())
    out = [(str(p.relative_to(REPO)), yaml.safe_load(p.read_text())["job"], templ)
           for p in sorted((REPO / "jobs" / "schedules").glob("*.yaml"))]
    out.append(("infra/jobspec-example.yaml", yaml.safe_load((INFRA / "jobspec-example.yaml").read_text())["job"],
                shared + templ))
    docs = [r for r in all_resources() if r[1]["kind"] in KUBERAY] + configmap_rayjob_templates()
    for where, doc in docs:
        clusters = ray_cluster_specs(doc)
        for rj in rayjob_specs(doc):
            env_vars = yaml.safe_load(rj["runtimeEnvYAML"]).get("env_vars", {})
            if CONFIG_ENV_VAR in env_vars:
                out.append((f"{where} {CONFIG_ENV_VAR}", yaml.safe_load(env_vars[CONFIG_ENV_VAR]), clusters))
            if SCHEDULE_ENV_VAR in env_vars:
                out.append((f"{where} {SCHEDULE_ENV_VAR}", yaml.safe_load(env_vars[SCHEDULE_ENV_VAR])["job"], clusters))
    for where, doc in all_resources():
        if doc["kind"] == "ConfigMap" and "schedule.yaml" in doc["data"]:
            out.append((f"{where} schedule.yaml", yaml.safe_load(doc["data"]["schedule.yaml"])["job"], templ))
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of infra/Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            instr, _, args = pending.partition(" ")
            out.append((instr.upper(), args))
            pending = ""
    return out


def copy_sources(args: str) -> list[str]:
    return [a for a in args.split() if not a.startswith("--")][:-1]


# --------------------------------------------------------------------------------- the validators work


def test_strict_crd_schema_rejects_typos_the_api_server_would_drop():
    good = yaml_docs(INFRA / "raycluster.yaml")[0]
    assert schema_errors(crd_schema("RayCluster"), good) == []
    for path, typo in ((("spec",), "enableInTreeAutoscale"),
                       (("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0), "imagePullPolicyy"),
                       (("spec", "headGroupSpec", "template", "spec"), "tolerationz")):
        bad = copy.deepcopy(good)
        node = bad
        for p in path:
            node = node[p]
        node[typo] = "x"
        assert any(typo in e for e in schema_errors(crd_schema("RayCluster"), bad)), f"typo {typo} not caught"


def test_serve_schema_accepts_typos_and_our_walk_rejects_them():
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((INFRA / "serve-config.yaml").read_text())
    cfg["applications"][0]["deployments"][0]["max_ongoing_request"] = 1
    cfg["applications"][0]["deployments"][0]["autoscaling_config"] = {"max_replica": 3}
    ServeDeploySchema.model_validate(cfg)  # Serve: fine, silently ignored
    assert sorted(unknown_serve_keys(ServeDeploySchema, cfg)) == [
        "applications[0].deployments[0].autoscaling_config.max_replica",
        "applications[0].deployments[0].max_ongoing_request"]


# ----------------------------------------------------------------------------------- KubeRay resources


@pytest.mark.parametrize("where,doc", all_resources(), ids=lambda x: x if isinstance(x, str) else "")
def test_resource_matches_its_schema(where, doc):
    kind = doc.get("kind")
    if kind in KUBERAY:
        assert doc.get("apiVersion") == "ray.io/v1", where
        errors = schema_errors(crd_schema(kind), doc) + schema_errors(metadata_schema(NAME_LIMITS[kind]),
                                                                    doc["metadata"])
    else:
        assert kind in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"), f"{where}: kind {kind}"
        errors = schema_errors(k8s_schema(kind), doc)
    assert errors == [], f"{where} ({kind}):\n" + "\n".join(errors)


@pytest.mark.parametrize("where,doc", [r for r in all_resources() if r[1]["kind"] in KUBERAY],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_kuberay_rules_and_conventions(where, doc):
    for cluster in ray_cluster_specs(doc):
        assert cluster["rayVersion"] == RAY_VERSION, f"{where}: rayVersion must match the image's Ray"
        assert cluster.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling must be on"
        assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: CPU-only, task-free head"
        for c in containers(cluster):
            assert RAY_VERSION in c["image"], f"{where}: image {c['image']} is not a Ray {RAY_VERSION} image"
            assert not any(m.get("mountPath") == "/dev/shm" for m in c.get("volumeMounts", [])), \
                f"{where}: KubeRay injects /dev/shm itself"
        for g in cluster.get("workerGroupSpecs", []):
            assert g.get("minReplicas", 0) <= g.get("replicas", 0) <= g["maxReplicas"], f"{where}: {g['groupName']}"
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{where}: worker group {g['groupName']} has no GPU"
    for rj in rayjob_specs(doc):
        ds = rj.get("deletionStrategy")
        if ds:  # CEL rules of the CRD + operator validation (validation.go)
            assert "deletionRules" in ds and not ({"onSuccess", "onFailure"} & set(ds)), where
            for rule in ds["deletionRules"]:
                assert ("jobStatus" in rule["condition"]) != ("jobDeploymentStatus" in rule["condition"]), where
            assert not rj.get("shutdownAfterJobFinishes") and "ttlSecondsAfterFinished" not in rj, \
                f"{where}: deletionStrategy cannot be combined with shutdownAfterJobFinishes/ttlSecondsAfterFinished"
        env = yaml.safe_load(rj["runtimeEnvYAML"])
        from ray.runtime_env import RuntimeEnv

        assert set(env) <= set(RuntimeEnv.known_fields), f"{where}: unknown runtime_env keys {set(env)}"
        RuntimeEnv(**env)
        env_vars = env.get("env_vars", {})
        if CONFIG_ENV_VAR in env_vars:
            validate_batch_config(yaml.safe_load(env_vars[CONFIG_ENV_VAR]))
            assert "run-with-config" in rj["entrypoint"], where
        if SCHEDULE_ENV_VAR in env_vars:
            Schedule.model_validate(yaml.safe_load(env_vars[SCHEDULE_ENV_VAR]))
            assert "run-scheduled" in rj["entrypoint"], where
        assert CONFIG_ENV_VAR in env_vars or SCHEDULE_ENV_VAR in env_vars, f"{where}: the job has no config"
        if "entrypointResources" in rj:
            assert isinstance(json.loads(rj["entrypointResources"]), dict), where
    if doc["kind"] == "RayCronJob":
        spec = doc["spec"]
        assert len(spec["schedule"].split()) == 5 and "TZ" not in spec["schedule"], where
        ZoneInfo(spec["timeZone"])
        assert "jobId" not in spec["jobTemplate"], f"{where}: a fixed jobId would collide on the second tick"
        assert "deletionStrategy" in spec["jobTemplate"], f"{where}: RayCronJob keeps every child RayJob otherwise"


def test_rayservice_serve_config_is_generated_from_serve_config():
    (svc,) = yaml_docs(INFRA / "rayservice.yaml")
    assert svc["spec"]["serveConfigV2"] == (INFRA / "serve-config.yaml").read_text(), \
        "infra/rayservice.yaml is stale: run `python infra/render.py`"


def test_derived_manifests_are_up_to_date(capsys):
    spec = importlib.util.spec_from_file_location("infra_render", INFRA / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert render.main(["--check"]) == 0, "run `python infra/render.py`:\n" + capsys.readouterr().out
    text = (INFRA / "rayservice.yaml").read_text()
    assert render.embed_serve_config(text, (INFRA / "serve-config.yaml").read_text()) == text


def test_every_schedule_renders_both_ways():
    names = {s.name for s in load_schedules()}
    assert names, "no schedules in jobs/schedules"
    files = rendered_schedules()
    assert set(files) == {f"{n}.{k}.yaml" for n in names for k in ("raycronjob", "cronjob")}
    assert {p.name for p in (INFRA / "schedules").glob("*.yaml")} == set(files)


# ----------------------------------------------------------------------------------------- Serve config


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def unknown_serve_keys(model: type[BaseModel], data: dict, path: str = "") -> list[str]:
    """Keys of `data` that `model` (recursively) does not declare."""
    names = {}
    for name, f in model.model_fields.items():
        names[name] = f
        if isinstance(f.alias, str):
            names[f.alias] = f
    out = []
    for key, value in data.items():
        if key not in names:
            out.append(f"{path}{key}")
            continue
        for sub in _models_in(names[key].annotation)[:1]:
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    where = f"{path}{key}[{i}]." if isinstance(value, list) else f"{path}{key}."
                    out += unknown_serve_keys(sub, item, where)
    return out


@pytest.mark.parametrize("source", ["serve-config.yaml", "rayservice.yaml#serveConfigV2"])
def test_serve_config_is_valid_and_strict(source):
    from ray.serve.schema import ServeDeploySchema

    if source == "serve-config.yaml":
        cfg = yaml.safe_load((INFRA / source).read_text())
    else:
        cfg = yaml.safe_load(yaml_docs(INFRA / "rayservice.yaml")[0]["spec"]["serveConfigV2"])
    from ray.serve.config import AutoscalingConfig

    parsed = ServeDeploySchema.model_validate(cfg)
    assert unknown_serve_keys(ServeDeploySchema, cfg) == [], "keys Serve would silently ignore"
    for app in parsed.applications:
        assert app.import_path == "pipeline.serve.app:build_app"
        assert app.args.get("model"), "the app needs args.model"
        autoscaling = app.args.get("autoscaling_config") or {}
        assert autoscaling, "the endpoint must autoscale (args.autoscaling_config, applied by build_app)"
        AutoscalingConfig.model_validate(autoscaling)
        assert unknown_serve_keys(AutoscalingConfig, autoscaling) == []
        assert app.args.get("num_gpus", 0) * app.args.get("tensor_parallel_size", 1) >= 1, "replicas need a GPU"


def test_serve_args_match_the_app():
    """`args` go to the app builder, which Serve cannot check before deploying: validate them here."""
    from pipeline.serve.app import ServeArgs

    for app in yaml.safe_load((INFRA / "serve-config.yaml").read_text())["applications"]:
        ServeArgs.model_validate(app["args"])


def test_serve_deployment_names_exist_in_the_app():
    """Serve rejects overrides for deployments the app does not define; check once the app has landed."""
    from ray import serve

    app_module = importlib.import_module("pipeline.serve.app")
    defined = {v.name for v in vars(app_module).values() if isinstance(v, serve.Deployment)}
    cfg = yaml.safe_load((INFRA / "serve-config.yaml").read_text())
    wanted = {d["name"] for a in cfg["applications"] for d in a.get("deployments", [])}
    assert wanted <= defined, f"serve-config.yaml overrides deployments {wanted - defined}; the app defines {defined}"


# ------------------------------------------------------------------------------------- cluster launcher


def test_cluster_launcher_matches_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml_docs(INFRA / "cluster-launcher.yaml")[0]
    errors = schema_errors(strict(schema), cfg)
    assert errors == [], "\n".join(errors)
    bad = {**cfg, "idle_timeout_minute": 5}
    assert schema_errors(strict(schema), bad), "the strict launcher schema must reject unknown keys"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert RAY_VERSION in cfg["docker"]["image"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])


# ------------------------------------------------------------------------------------------ entry points


def module_exists(mod: str) -> bool:
    base = REPO / mod.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command the manifests and the Dockerfile run."""
    out = []
    for where, doc in all_resources():
        for rj in rayjob_specs(doc):
            out.append((where, shlex.split(rj["entrypoint"])))
        if doc["kind"] == "CronJob":
            for c in doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
                out.append((where, c["command"]))
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.startswith("CMD"):
            out.append(("Dockerfile CMD", json.loads(line[3:])))
    return out


def test_entrypoints_name_existing_modules_and_valid_cli_commands():
    dockerfile = (INFRA / "Dockerfile").read_text()
    mods = set(re.findall(r"python -m ([\w.]+)", dockerfile))
    mods |= set(re.findall(r"'([\w.]+)'", re.search(r"find_spec.*", dockerfile).group(0)))
    assert {"jobs.batch", "jobs.serve", "jobs.cli"} <= mods, "the Dockerfile must check all entry points"
    for where, argv in command_lines():
        for i, arg in enumerate(argv[:-1]):
            if arg == "-m" and argv[i - 1] == "python":
                mods.add(argv[i + 1])
        if argv[:3] == ["python", "-m", "jobs.cli"] and argv[3:] != ["--help"]:
            args = cli.build_parser().parse_args(argv[3:])  # SystemExit on a bad command line
            if args.fn in (cli.cmd_run_with_config, cli.cmd_run_scheduled):
                assert cli._command(args)[:3] == ["python", "-m", "jobs.batch"] or "-c" in cli._command(args), where
    missing = {m for m in mods if not module_exists(m)}
    assert not missing - PENDING, f"entry points name missing modules: {sorted(missing - PENDING)}"
    if missing:
        pytest.skip(f"waiting for modules owned by others: {sorted(missing)}")


def test_dockerfile_base_image_and_context():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:2\.60\.0-py311-gpu$", text, re.M)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    assert "**/.venv" in (INFRA / "Dockerfile.dockerignore").read_text()
    sources = [s for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M) for s in line.split()[:-1]]
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not set(missing) - PENDING, f"COPY sources missing: {missing}"
    if missing:
        pytest.skip(f"waiting for files owned by others: {missing}")


def test_jobspec_example_is_valid():
    spec = JobSpec.from_yaml(INFRA / "jobspec-example.yaml")
    assert spec.effective_submission_id == JobSpec.from_yaml(INFRA / "jobspec-example.yaml").effective_submission_id


# ------------------------------------------------------------------------------------ GPU fleet (issue 15)


@pytest.mark.parametrize("where,cluster", all_clusters(), ids=lambda x: x if isinstance(x, str) else "")
def test_gpu_worker_groups_request_gpus(where, cluster):
    groups = [g for g in cluster.get("workerGroupSpecs", []) if is_gpu_group(g)]
    assert groups, f"{where}: no GPU worker group: GPU replicas would never be placed"
    for g in groups:
        limits, requests = pod_gpus(g["template"]), pod_gpus(g["template"], "requests")
        assert limits >= 1, f"{where}: GPU worker group {g['groupName']} has no {GPU} limit (Ray would see 0 GPUs)"
        assert requests in (0, limits), f"{where}: {g['groupName']}: {GPU} requests must equal limits"
    assert pod_gpus(cluster["headGroupSpec"]["template"]) == 0, f"{where}: the head must not hold a GPU"


def test_every_shipped_job_config_is_found():
    where = [w for w, _, _ in batch_job_configs()]
    for s in load_schedules():  # source, RayCronJob, CronJob ConfigMap, launcher RayJob
        assert len([w for w in where if s.name in w]) >= 4, (s.name, where)
    assert any(w.startswith("infra/rayjob-batch.yaml") for w in where), where
    assert len([w for w in where if "jobspec-example" in w]) == 2, where  # the spec and its RayJob


@pytest.mark.parametrize("where,cfg,clusters", batch_job_configs(), ids=lambda x: x if isinstance(x, str) else "")
def test_batch_job_configs_run_on_gpus(where, cfg, clusters):
    assert cfg.get("device") == "cuda", f"{where}: say `device: cuda` (the cluster starts without GPU workers)"
    assert "use_gpu" not in cfg, f"{where}: use_gpu is gone; device says where replicas run"
    model = validate_batch_config(cfg)
    if hasattr(model, "device"):
        assert model.device == "cuda", where
    tp = model.tensor_parallel_size
    lo, hi = model.num_replicas, getattr(model, "max_replicas", None) or model.num_replicas
    assert lo <= hi, where
    assert clusters, f"{where}: no cluster to check the config against"
    for cluster in clusters:
        pods = [(pod_gpus(g["template"]), g["maxReplicas"] * g.get("numOfHosts", 1))
                for g in cluster.get("workerGroupSpecs", [])]
        assert any(gpus >= tp for gpus, _ in pods), \
            f"{where}: no worker pod holds tensor_parallel_size={tp} GPUs (a replica's ranks share one pod)"
        capacity = sum((gpus // tp) * n for gpus, n in pods)
        assert hi <= capacity, f"{where}: up to {hi} replicas of TP {tp}, but the cluster holds {capacity}"
        check_cluster_fits_job(cfg, {"spec": {"rayClusterSpec": cluster}})


def test_rendering_refuses_gpu_jobs_the_cluster_cannot_hold():
    base = yaml.safe_load((INFRA / "jobspec-example.yaml").read_text())
    for bad in ({"tensor_parallel_size": 2}, {"num_replicas": 9, "max_replicas": 9}):
        spec = JobSpec.model_validate({**base, "job": {**base["job"], **bad}})
        with pytest.raises(ValueError, match="GPU replicas"):
            rayjob_from_spec(spec, template())
    cpu = {k: v for k, v in base["job"].items() if k != "max_replicas"}
    spec = JobSpec.model_validate({**base, "job": {**cpu, "device": "cpu", "num_replicas": 64}})
    assert rayjob_from_spec(spec, template())["kind"] == "RayJob"  # CPU jobs are not the GPU groups' business


def _cache_mount(container: dict) -> tuple[str, str] | None:
    """(volume name, mount path) of the mount holding the container's $GLM4_MODEL_CACHE, if any."""
    cache = next((e.get("value") for e in container.get("env", []) if e["name"] == "GLM4_MODEL_CACHE"), None)
    for m in container.get("volumeMounts", []) if cache else []:
        if cache == m["mountPath"] or cache.startswith(m["mountPath"].rstrip("/") + "/"):
            return m["name"], m["mountPath"]
    return None


@pytest.mark.parametrize("where,cluster", all_clusters(), ids=lambda x: x if isinstance(x, str) else "")
def test_model_cache_volume_is_writable_for_ray(where, cluster):
    """A hostPath DirectoryOrCreate is created root:0755 and hides the image's chown; fsGroup does not apply to
    hostPath. So: an init container running as root chowns the mount to Ray's uid, or (emptyDir/PVC) fsGroup."""
    checked = 0
    for is_head, g in [(True, cluster["headGroupSpec"]), *((False, w) for w in cluster.get("workerGroupSpecs", []))]:
        pod = g["template"]["spec"]
        name = "head" if is_head else g["groupName"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            uid = c.get("securityContext", {}).get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
            assert uid in (None, RAY_UID), f"{where}: {name}/{c['name']} runs as {uid}, not Ray's uid {RAY_UID}"
            mount = _cache_mount(c)
            if mount is None:
                continue  # the cache is the image's own directory, owned by ray (Dockerfile)
            vol, path = mount
            checked += 1
            owners = [i for i in pod.get("initContainers", [])
                      if any(m["name"] == vol and m["mountPath"] == path for m in i.get("volumeMounts", []))
                      and i.get("securityContext", {}).get("runAsUser") == 0
                      and re.search(rf"chown (-R )?{RAY_UID}(:\d+)? (\S+ )*{re.escape(path)}(/| |$)",
                                    " ".join(i.get("command", []) + i.get("args", [])))]
            if "hostPath" in volumes[vol]:
                assert owners, (f"{where}: {name}: hostPath cache {path} needs a root init container that chowns it "
                                f"to {RAY_UID} (fsGroup does not apply to hostPath)")
            else:
                assert owners or pod.get("securityContext", {}).get("fsGroup") is not None, \
                    f"{where}: {name}: cache volume {vol} needs fsGroup (or a chown init container)"
        if not is_head and is_gpu_group(g):
            assert any(_cache_mount(c) for c in pod["containers"]), f"{where}: {name} has no node-local model cache"
    assert checked, f"{where}: no model cache mount found"


def test_rayservice_api_key_comes_from_a_secret():
    from pipeline.serve.config import API_KEY_ENV

    (svc,) = yaml_docs(INFRA / "rayservice.yaml")
    (cluster,) = ray_cluster_specs(svc)
    for app in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]:
        assert "api_key" not in app.get("args", {}), "no API key literal in serveConfigV2 (use the Secret)"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for g in groups:
        for c in g["template"]["spec"]["containers"] + g["template"]["spec"].get("initContainers", []):
            for e in c.get("env", []):
                assert not (e["name"] == API_KEY_ENV and "value" in e), f"{c['name']}: {API_KEY_ENV} is a literal"
    refs = set()
    for g in cluster["workerGroupSpecs"]:  # where the replicas run (and read the key)
        for c in g["template"]["spec"]["containers"]:
            (env,) = [e for e in c.get("env", []) if e["name"] == API_KEY_ENV] or [None]
            assert env, f"{g['groupName']}/{c['name']}: no {API_KEY_ENV}: the endpoint would run without auth"
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref.get("optional", False) is False, "a missing Secret must stop the pod, not disable auth"
            refs.add((ref["name"], ref["key"]))
    assert len(refs) == 1, refs
    ((secret, key),) = refs
    readme = (INFRA / "README.md").read_text()
    assert f"kubectl create secret generic {secret}" in readme and f"--from-literal={key}=" in readme, \
        "infra/README.md must show how to create the Secret the RayService reads"


def test_dockerfile_installs_dependencies_before_copying_the_code():
    steps = dockerfile_instructions()
    copies = [(i, copy_sources(a)) for i, (ins, a) in enumerate(steps) if ins == "COPY"]
    assert not any(s in (".", "./") for _, srcs in copies for s in srcs), "COPY . invalidates the dependency layer"
    (deps_copy,) = [i for i, srcs in copies if "pyproject.toml" in srcs]
    code = [i for i, srcs in copies if set(srcs) & set(PACKAGES)]
    assert {s for _, srcs in copies for s in srcs} >= set(PACKAGES), "every package must be copied"
    assert deps_copy < min(code), "pyproject.toml must be copied (and installed) before the code"
    assert not set(dict(copies)[deps_copy]) & set(PACKAGES)
    pip = [(i, a) for i, (ins, a) in enumerate(steps) if ins == "RUN" and "pip install" in a]
    deps = [a for i, a in pip if deps_copy < i < min(code)]
    assert deps and "pyproject.toml" in deps[0] and "--no-deps" not in deps[0], \
        "install the dependencies listed in pyproject.toml between COPY pyproject.toml and COPY <code>"
    after = [a for i, a in pip if i > min(code)]
    assert after and all("--no-deps" in a for a in after), "after the code, install the project with --no-deps"
    assert any(i > max(code) for i, _ in pip), "the project is installed after all of its code is copied"
    import tomllib

    pins = [d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
            if re.match(r"torch\b", d)]
    assert len(pins) == 1 and re.fullmatch(r"torch==[\w.+]+", pins[0]), f"pyproject must pin torch: {pins}"
    text = (INFRA / "Dockerfile").read_text()
    assert set(re.findall(r"torch==[\w.+]+", text)) <= {pins[0]}, "the Dockerfile's torch pin differs from pyproject"
