"""What the Serve app is configured with: :class:`ServeArgs` (the ``args`` of a Serve config application, unknown
keys rejected) and the Serve deployment options derived from them (:func:`deployment_options`).

Serve's own per-replica limit is set above the replica's admission limits (see ``pipeline.serve.admission``), so
the replica decides, not a proxy queue; Serve's proxy queue is bounded too, answering 429 + Retry-After as a second
line (Serve's ``BackpressureConfig``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

API_KEY_ENV = "GLM4_API_KEY"
DEPLOYMENT_NAME = "GLM4Server"
DEFAULT_ENGINE_CLS = "glm4:AsyncLLMEngine"
DEFAULT_TP_EXECUTOR = "pipeline.tp_ray:RayExecutor"
# Serve-level concurrency headroom above our admission limits, for /health, /v1/models and /admin/stats.
_CONTROL_HEADROOM = 16


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args`` of a Serve config application). Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Checkpoint directory (config.json, *.safetensors, tokenizer.model), or an "
                       "s3:// / file:// URI; s3:// is downloaded once per node into model_cache_dir.")
    model_cache_dir: Optional[str] = Field(None, description="Node-local cache for s3:// models; default "
                                           "$GLM4_MODEL_CACHE or ~/.cache/glm4-ray/models.")
    storage: dict[str, Any] = Field(default_factory=dict, description="Object-storage options for s3:// models "
                                    "(pipeline.config.StorageOptions fields); unset ones come from the environment.")
    served_model_name: Optional[str] = Field(None, description="Name clients send as `model`; default: the "
                                             "checkpoint directory's name.")
    model_aliases: list[str] = Field(default_factory=list, description="Other accepted `model` names.")
    api_key: Optional[str] = Field(None, description=f"Bearer token required on /v1/* and /admin/*; default: "
                                   f"env {API_KEY_ENV} in the replica; unset = no auth.")
    # --- replicas and resources
    num_replicas: int = Field(1, ge=1, description="Fixed replica count (ignored with autoscaling_config).")
    autoscaling_config: Optional[dict[str, Any]] = Field(None, description="Serve autoscaling_config.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica actor (fractional is fine).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica at tensor_parallel_size=1.")
    tensor_parallel_size: int = Field(1, ge=1, description="Ranks per replica; >1 uses placement-group bundles.")
    tp_worker_num_cpus: float = Field(1.0, ge=0, description="CPUs per extra TP rank bundle.")
    placement_group_strategy: str = Field("STRICT_PACK", description="For tensor_parallel_size > 1.")
    executor: Optional[str] = Field(None, description=f"Engine executor 'module:Class'; default "
                                    f"{DEFAULT_TP_EXECUTOR} when tensor_parallel_size > 1.")
    # --- admission control (per replica)
    max_ongoing_requests: int = Field(64, ge=1, description="Requests generating at once per replica.")
    max_queued_requests: int = Field(64, ge=0, description="Requests waiting per replica; past it: 429.")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with 429.")
    proxy_max_queued_requests: int = Field(256, ge=1, description="Serve's own per-caller queue bound "
                                           "(second line, also 429).")
    # --- request limits
    max_tokens_limit: Optional[int] = Field(None, ge=1, description="Largest max_tokens a request may ask for "
                                            "(default: the context length).")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body; past it: 413.")
    max_sequences_per_request: int = Field(256, ge=1, description="Largest (number of prompts) x n of one "
                                           "request; past it: 400. One request holds one admission slot, so "
                                           "without this bound one call could queue thousands of sequences.")
    # --- engine
    engine_options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of "
                                           "AsyncLLMEngine.from_pretrained (as glm4.LLM).")
    dtype: Optional[str] = None
    device: Optional[str] = None
    max_model_len: Optional[int] = Field(None, ge=2)
    max_num_seqs: Optional[int] = Field(None, ge=1)
    kv_cache_memory: Optional[float] = Field(None, gt=0, description="Bytes (>1) or a fraction of free memory.")
    engine_cls: str = Field(DEFAULT_ENGINE_CLS, description="'module:Class' with from_pretrained(dir, **opts) and "
                            "glm4.AsyncLLMEngine's generate(ids, params, request_id, final_only=...).")
    # --- observability
    enable_access_log: bool = Field(False, description="Serve's per-request access log line.")
    stats_interval_s: float = Field(1.0, gt=0, description="How often engine gauges are refreshed.")

    @field_validator("placement_group_strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        if v not in {"PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"}:
            raise ValueError(f"placement_group_strategy must be PACK/STRICT_PACK/SPREAD/STRICT_SPREAD, got {v!r}")
        return v

    def resolved_engine_options(self) -> dict[str, Any]:
        opts = dict(self.engine_options)
        for key in ("dtype", "device", "max_model_len", "max_num_seqs"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        if self.kv_cache_memory is not None:
            kv = self.kv_cache_memory
            opts["kv_cache_memory"] = int(kv) if kv > 1 else float(kv)
        if self.tensor_parallel_size > 1:
            opts["tensor_parallel_size"] = self.tensor_parallel_size
            opts.setdefault("executor", self.executor or DEFAULT_TP_EXECUTOR)
        elif self.executor:
            opts.setdefault("executor", self.executor)
        return opts

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model.rstrip("/")).name or "glm4"

    def local_model_dir(self) -> Path:
        """The checkpoint as a local directory (downloading an s3:// model into the node cache first)."""
        from pipeline.config import StorageOptions, default_model_cache_dir
        from pipeline.io import resolve_model_dir

        cache = self.model_cache_dir or default_model_cache_dir()
        storage = StorageOptions.model_validate(self.storage) if self.storage else None
        return resolve_model_dir(self.model, storage, cache)


def deployment_options(args: ServeArgs) -> dict[str, Any]:
    """Serve deployment options derived from the app args (resources, limits, placement group)."""
    from ray.serve.config import BackpressureConfig

    opts: dict[str, Any] = {
        # The replica's own admission control decides (and answers 429 with OpenAI's body); Serve's cap sits
        # above it so requests reach a replica instead of waiting in a proxy queue.
        "max_ongoing_requests": args.max_ongoing_requests + args.max_queued_requests + _CONTROL_HEADROOM,
        "max_queued_requests": args.proxy_max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=max(1.0, args.retry_after_s)),
        "logging_config": {"enable_access_log": args.enable_access_log},
        "graceful_shutdown_timeout_s": 60.0,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }
    if args.autoscaling_config is not None:
        opts["autoscaling_config"] = args.autoscaling_config
    else:
        opts["num_replicas"] = args.num_replicas
    tp = args.tensor_parallel_size
    if tp > 1:
        # Bundle 0 holds the replica (rank 0, which runs the scheduler); bundles 1..tp-1 the other ranks, on one
        # node (STRICT_PACK: NVLink, and the placement fails instead of silently spanning nodes).
        gpu = 1.0 if (args.num_gpus > 0 or args.device not in (None, "cpu")) else 0.0
        bundle0: dict[str, float] = {"CPU": args.num_cpus}
        rest: dict[str, float] = {"CPU": args.tp_worker_num_cpus}
        if gpu:
            bundle0["GPU"] = gpu
            rest["GPU"] = gpu
        opts["ray_actor_options"] = {"num_cpus": args.num_cpus, "num_gpus": gpu}
        opts["placement_group_bundles"] = [bundle0] + [dict(rest) for _ in range(tp - 1)]
        opts["placement_group_strategy"] = args.placement_group_strategy
    else:
        opts["ray_actor_options"] = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    return opts
