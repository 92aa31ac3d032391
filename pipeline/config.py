"""Typed configuration of the batch job (`glm4-batch`), readable from YAML and from CLI flags.

Every field carries a description: it is the user documentation (`glm4-batch --help` prints the flags,
`python -c "from pipeline.config import BatchJobConfig; print(BatchJobConfig.model_json_schema())"` the rest).
Unknown keys are an error at every level, so a typo in a job file fails loudly instead of being ignored.

Secrets (S3 credentials) are `SecretStr`: they never appear in `model_dump()`, logs or the manifest. They are
normally not written in the job file at all but taken from the usual AWS variables when the job runs
(`StorageOptions.resolved()`).

Example job file::

    input: s3://prompts/2026-11-28/
    output: s3://results/glm4/2026-11-28/
    model: s3://models/glm-4-9b-chat/
    messages_column: messages
    id_column: prompt_id
    sampling: {max_tokens: 256, temperature: 0.0}
    num_replicas: 4
    storage: {endpoint_url: http://minio:9000}
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageOptions(_Strict):
    """How to reach object storage (S3 or S3-compatible). Anything left unset comes from the environment."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint URL for S3-compatible stores (MinIO, moto, ...). Default: $AWS_ENDPOINT_URL_S3, "
        "then $AWS_ENDPOINT_URL, then AWS itself.",
    )
    region: str | None = Field(
        default=None,
        description="Region name. Default: $AWS_REGION / $AWS_DEFAULT_REGION as botocore reads them. Only set it "
        "when needed: an explicit us-east-1 makes s3fs send a LocationConstraint that bucket creation rejects.",
    )
    access_key_id: SecretStr | None = Field(
        default=None, description="Access key id. Default: $AWS_ACCESS_KEY_ID. Never logged."
    )
    secret_access_key: SecretStr | None = Field(
        default=None, description="Secret access key. Default: $AWS_SECRET_ACCESS_KEY. Never logged."
    )
    session_token: SecretStr | None = Field(
        default=None, description="Session token for temporary credentials. Default: $AWS_SESSION_TOKEN. Never logged."
    )
    anon: bool = Field(default=False, description="Anonymous access (public buckets); ignores credentials.")
    connect_timeout_s: float = Field(
        default=10.0, gt=0, description="Seconds to wait for a connection to the endpoint before a retry."
    )
    read_timeout_s: float = Field(default=60.0, gt=0, description="Seconds to wait for a response before a retry.")
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts per S3 request (botocore). Together with the timeouts this bounds how long the job "
        "waits for an unreachable store before it fails with a storage error.",
    )

    def resolved(self) -> "StorageOptions":
        """A copy with unset endpoint/credentials filled from the usual AWS environment variables.

        Done when the job runs (not when the config is parsed), so the values reach the Ray workers through the
        filesystem object even on nodes whose environment lacks them, and never land in a dumped config.
        """
        env = os.environ
        upd: dict[str, Any] = {}
        if self.endpoint_url is None:
            upd["endpoint_url"] = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        for field, var in (
            ("access_key_id", "AWS_ACCESS_KEY_ID"),
            ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            ("session_token", "AWS_SESSION_TOKEN"),
        ):
            if getattr(self, field) is None and env.get(var):
                upd[field] = SecretStr(env[var])
        return self.model_copy(update=upd)

    def s3fs_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `s3fs.S3FileSystem` (call on a `resolved()` copy)."""
        kw: dict[str, Any] = {
            "anon": self.anon,
            # Listings must be fresh: a rerun lists output/checkpoint prefixes that the previous run changed.
            "use_listings_cache": False,
            "skip_instance_cache": True,
            "config_kwargs": {
                "connect_timeout": self.connect_timeout_s,
                "read_timeout": self.read_timeout_s,
                "retries": {"max_attempts": self.max_attempts, "mode": "standard"},
            },
        }
        if self.endpoint_url:
            kw["endpoint_url"] = self.endpoint_url
        if not self.anon:
            if self.access_key_id is not None:
                kw["key"] = self.access_key_id.get_secret_value()
            if self.secret_access_key is not None:
                kw["secret"] = self.secret_access_key.get_secret_value()
            if self.session_token is not None:
                kw["token"] = self.session_token.get_secret_value()
        if self.region:
            kw["client_kwargs"] = {"region_name": self.region}
        return kw


class SamplingDefaults(_Strict):
    """Default sampling parameters (vLLM names, as `glm4.SamplingParams`); a per-row column may override them."""

    max_tokens: int = Field(default=256, ge=1, description="Maximum number of generated tokens per row.")
    min_tokens: int = Field(default=0, ge=0, description="Minimum number of generated tokens before a stop applies.")
    temperature: float = Field(
        default=0.0,
        ge=0.0,
        description="Sampling temperature; 0 means greedy. The batch default is greedy so that a rerun gives the "
        "same text for the same row.",
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling probability mass.")
    top_k: int = Field(default=-1, description="Top-k sampling; 0 or -1 disables it.")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="Minimum probability relative to the top token.")
    repetition_penalty: float = Field(default=1.0, gt=0.0, description="Repetition penalty (1.0 = off).")
    presence_penalty: float = Field(default=0.0, description="Presence penalty (0.0 = off).")
    frequency_penalty: float = Field(default=0.0, description="Frequency penalty (0.0 = off).")
    seed: int | None = Field(default=None, description="Sampling seed; with temperature > 0 makes rows reproducible.")
    stop: list[str] | None = Field(default=None, description="Stop strings (not included in the output).")
    stop_token_ids: list[int] | None = Field(
        default=None, description="Stop token ids; default (null) is the tokenizer's three GLM-4 stop ids."
    )
    ignore_eos: bool = Field(default=False, description="Keep generating after a stop token (benchmarks).")
    skip_special_tokens: bool = Field(default=True, description="Drop special tokens from generated_text.")

    def as_params(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class EngineOptions(_Strict):
    """Options passed to `glm4.LLM(model_dir, **options)` inside each replica."""

    dtype: str | None = Field(
        default=None, description="Weight/activation dtype (e.g. bfloat16, float32); default: bfloat16 when the "
        "job's device is cuda, else the checkpoint's."
    )
    device: str | None = Field(default=None, description="torch device override; default: the job's `device` "
                               "(tests use it to run on CPU while the replica still reserves logical GPUs).")
    max_num_seqs: int = Field(default=256, ge=1, description="Maximum sequences the engine runs at once.")
    max_num_batched_tokens: int = Field(default=2048, ge=1, description="Token budget of one engine step.")
    max_model_len: int | None = Field(
        default=None, ge=2, description="Context length; default: the checkpoint's. Longer prompts become error rows."
    )
    block_size: int = Field(default=16, ge=1, description="KV-cache block size in tokens.")
    kv_cache_memory: int | float | None = Field(
        default=None, description="KV-cache size: bytes (int) or a fraction (float) of free memory."
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV blocks of shared prompt prefixes.")
    seed: int = Field(default=0, description="Engine seed.")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Further `glm4.LLM` keyword arguments, passed through unchanged."
    )

    def llm_kwargs(self, tensor_parallel_size: int, job_device: str) -> dict[str, Any]:
        kw = self.model_dump(exclude={"extra"}, exclude_none=True)
        kw["tensor_parallel_size"] = tensor_parallel_size
        kw.setdefault("device", job_device)
        if job_device == "cuda":
            kw.setdefault("dtype", "bfloat16")
        kw.update(self.extra)
        return kw


class BatchJobConfig(_Strict):
    """One batch inference job: Parquet prompts in, Parquet results (plus manifest.json and _SUCCESS) out."""

    # --- data --------------------------------------------------------------------------------------------------
    input: str = Field(
        description="Input: Parquet prompt files, or OpenAI Batch request files (*.jsonl: one {custom_id, method, "
        "url, body} object per line; results are then OpenAI Batch output lines in <output>/data/*.jsonl). A file, "
        "a directory (every *.parquet or *.jsonl below it; one format per job) or a glob; local, file:// or s3://."
    )
    output: str = Field(
        description="Output directory (local, file:// or s3://). Results go to <output>/data/*.parquet, then "
        "<output>/manifest.json and <output>/_SUCCESS (written last)."
    )
    prompt_column: str | None = Field(
        default=None, description="Column with a plain-text prompt per row. Parquet input needs exactly one of "
        "prompt/messages column; OpenAI Batch (.jsonl) input takes neither (each line carries its request)."
    )
    messages_column: str | None = Field(
        default=None,
        description="Column with a chat conversation per row: a list of {role, content} structs, or a JSON string "
        "of that list. The GLM-4 chat template is applied. Exactly one of prompt/messages column.",
    )
    id_column: str | None = Field(
        default=None,
        description="Column with a unique, stable row id (string or integer). Default: a derived id "
        "'<file path relative to the input>#<row number>' in a column named 'id'.",
    )
    sampling_params_column: str | None = Field(
        default=None,
        description="Optional column of per-row sampling-parameter overrides: a struct or a JSON object string "
        "with SamplingParams field names. Invalid values make that row an error row.",
    )
    carry_columns: list[str] | None = Field(
        default=None,
        description="Input columns copied to the output next to the id; null = all input columns, [] = none.",
    )
    # --- sampling and model -------------------------------------------------------------------------------------
    sampling: SamplingDefaults = Field(
        default_factory=SamplingDefaults, description="Default sampling parameters for every row."
    )
    model: str = Field(
        description="Model directory (config.json, *.safetensors, tokenizer.model): local path or s3:// URI. An "
        "s3:// model is downloaded once per node into model_cache_dir under a file lock; only safetensors "
        "weights are accepted."
    )
    model_cache_dir: str = Field(
        default_factory=lambda: default_model_cache_dir(),
        description="Node-local directory for downloaded models. Default: $GLM4_MODEL_CACHE or "
        "~/.cache/glm4-ray/models.",
    )
    engine: EngineOptions = Field(default_factory=EngineOptions, description="Engine options of each replica.")
    device: Literal["cuda", "cpu"] = Field(
        default="cuda",
        description="Where replicas run, and so what they request from Ray: 'cuda' reserves tensor_parallel_size "
        "GPUs per replica (and defaults engine.dtype to bfloat16); 'cpu' reserves none. Never inferred from the "
        "cluster: an autoscaling cluster has no GPU until a replica asks for one.",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs (or CPU ranks) per replica; a replica reserves this many GPUs."
    )
    # --- fleet --------------------------------------------------------------------------------------------------
    num_replicas: int = Field(
        default=1, ge=1, description="Engine replicas (actors, each one glm4.LLM) the job starts with and keeps "
        "at least; the job waits for their resources (see resource_timeout_s) before any row is read.")
    max_replicas: int | None = Field(
        default=None, ge=1, description="Autoscaling: Ray Data grows the replica pool up to this many while there "
        "is work queued and the cluster (or its autoscaler) has room; default: num_replicas (a fixed pool).")
    resource_timeout_s: float = Field(
        default=900.0, gt=0, description="How long to wait for the first num_replicas replicas' resources (GPU "
        "nodes joining an autoscaling cluster take minutes). Past it the job fails naming what it waited for.")
    replica_num_cpus: float = Field(
        default=1.0,
        gt=0,
        description="CPUs reserved per replica. Fractions are allowed and needed on small machines: actors that "
        "reserve every CPU leave none for the read tasks and Ray Data waits forever.",
    )
    replica_memory: int | None = Field(
        default=None,
        ge=1,
        description="Bytes of memory reserved per replica for Ray's scheduling (weights + KV cache + activations); "
        "default: none reserved. Set it on shared clusters so replicas do not land on nodes that cannot hold them.",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads per replica (CPU); default: Ray's choice (the "
        "replica's CPUs, at least 1). On CPU, one single-threaded replica per core is the fastest layout (see "
        "bench/README.md)."
    )
    batch_size: int = Field(
        default=32,
        ge=1,
        description="Rows per engine call. Small batches keep replicas busy and limit redone work after a crash.",
    )
    batches_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Batches each replica works on at once. Their rows share the engine (continuous batching), so "
        "a batch waiting for its slowest row holds one sequence slot, not the replica. Default: enough batches for "
        "2 x engine.max_num_seqs rows, so the engine always has a full queue.",
    )
    preprocess_num_cpus: float = Field(
        default=0.5, gt=0, description="CPUs per tokenize task (the validate/tokenize stage)."
    )
    read_bytes_per_task: int = Field(
        default=64 * 2**20, ge=1, description="Bytes of an OpenAI Batch .jsonl file per read task (a large file is "
        "read by several tasks, each owning the lines that start in its byte range).")
    read_rows_per_task: int = Field(
        default=4096,
        ge=1,
        description="Rows per read task (whole row groups, so a task may read more). Small values give finer "
        "progress and resume granularity on small inputs.",
    )
    rows_per_file: int = Field(
        default=2000,
        ge=1,
        description="Target rows per output file (a hint). A file is also the unit of checkpointing: rows count as "
        "done once their file is committed.",
    )
    # --- placement ----------------------------------------------------------------------------------------------
    prefix_aware: bool = Field(
        default=True,
        description="Order rows by their leading token ids within a streaming window of prefix_window_rows rows "
        "before batching, so rows sharing a prompt prefix (system prompt, few-shot block) travel in the same "
        "batches to the same replica and hit its prefix cache. No global sort: results are written while input is "
        "still being read, and every block stays at batch_size rows whatever the prefix distribution.",
    )
    prefix_tokens: int = Field(
        default=64, ge=1, description="How many leading tokens define a row's prefix for prefix-aware ordering."
    )
    prefix_window_rows: int = Field(
        default=16384, ge=1, description="Rows ordered together by prefix-aware placement (a window holds their "
        "token ids in one task's memory; larger windows group rare prefixes better)."
    )
    # --- reliability --------------------------------------------------------------------------------------------
    max_engine_restarts: int = Field(
        default=3, ge=0, description="How many times per job a replica whose engine died (e.g. a killed tensor-"
        "parallel worker) is replaced by restarting its process; past it the job fails (a rerun resumes).")
    max_error_fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Largest fraction of error rows for which the job still succeeds; above it the job exits with "
        "status 3 and writes no _SUCCESS (the results and the manifest are still written).",
    )
    checkpoint_uri: str | None = Field(
        default=None,
        description="Where Ray Data's row-level checkpoint lives; default <output>/_checkpoint. Must be shared by "
        "all nodes (object storage or a network file system). Removed after _SUCCESS unless keep_checkpoint.",
    )
    keep_checkpoint: bool = Field(default=False, description="Keep the checkpoint directory after success.")
    overwrite: bool = Field(
        default=False,
        description="Delete the output directory first. Without it, a finished output (_SUCCESS) makes the job a "
        "no-op and an unfinished one is resumed.",
    )
    # --- runtime ------------------------------------------------------------------------------------------------
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object-storage access.")
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster address for ray.init (e.g. 'auto', 'local', 'ray://head:10001'); default: connect "
        "to a running cluster if there is one, else start a local one. Ignored if Ray is already initialized.",
    )
    progress_interval_s: float = Field(
        default=10.0, gt=0, description="Seconds between progress lines on the console."
    )
    ray_progress_bars: bool = Field(default=False, description="Also show Ray Data's own per-operator progress bars.")

    @field_validator("input", "output", "model")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @model_validator(mode="after")
    def _check(self) -> "BatchJobConfig":
        if self.prompt_column is not None and self.messages_column is not None:
            raise ValueError("set exactly one of prompt_column and messages_column")
        if self.prompt_column is None and self.messages_column is None and not self.is_openai_batch_input:
            # A directory may still hold .jsonl files: run_batch decides once it has listed them.
            if self.input.rstrip("/").endswith(".parquet"):
                raise ValueError("set exactly one of prompt_column and messages_column")
        if self.engine.max_model_len is not None and self.sampling.max_tokens >= self.engine.max_model_len:
            raise ValueError(
                f"sampling.max_tokens ({self.sampling.max_tokens}) must be below engine.max_model_len "
                f"({self.engine.max_model_len})"
            )
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be at least num_replicas ({self.num_replicas})")
        internal = [c for c in self.carry_columns or [] if c.startswith("__")]
        if internal:
            raise ValueError(f"carry_columns may not start with '__' (reserved): {internal}")
        return self

    # --- derived locations ----------------------------------------------------------------------------------------
    @property
    def data_uri(self) -> str:
        return join_uri(self.output, "data")

    @property
    def resolved_checkpoint_uri(self) -> str:
        return self.checkpoint_uri or join_uri(self.output, "_checkpoint")

    @property
    def is_openai_batch_input(self) -> bool:
        """The input names .jsonl files (a directory is only known once listed)."""
        return self.input.rstrip("/").endswith(".jsonl")

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) replicas of the autoscaling pool."""
        return self.num_replicas, self.max_replicas or self.num_replicas

    @property
    def rows_in_flight_batches(self) -> int:
        """Batches in flight per replica: explicit, or enough for twice the engine's sequence slots."""
        if self.batches_in_flight is not None:
            return self.batches_in_flight
        return max(2, -(-2 * self.engine.max_num_seqs // self.batch_size))

    @property
    def output_id_column(self) -> str:
        return self.id_column or DERIVED_ID_COLUMN

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-able data with every secret masked (for logs and manifest.json)."""
        data = self.model_dump(mode="json")
        for k in ("access_key_id", "secret_access_key", "session_token"):
            if data["storage"].get(k) is not None:
                data["storage"][k] = "***"
        data["storage"]["endpoint_url"] = redact_uri(data["storage"]["endpoint_url"])
        for k in ("input", "output", "model", "checkpoint_uri"):
            data[k] = redact_uri(data[k])
        return data

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "BatchJobConfig":
        """Read a YAML job file; `overrides` (dotted keys, e.g. `sampling.max_tokens=8`) win over the file."""
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a job file must be a YAML mapping, got {type(data).__name__}")
        for key, value in overrides.items():
            set_dotted(data, key, value)
        return cls.model_validate(data)


DERIVED_ID_COLUMN = "id"


def default_model_cache_dir() -> str:
    """The node-local model cache used by batch jobs and the Serve app alike: $GLM4_MODEL_CACHE, else
    ~/.cache/glm4-ray/models."""
    return os.environ.get("GLM4_MODEL_CACHE") or str(Path.home() / ".cache" / "glm4-ray" / "models")


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def redact_uri(uri: str | None) -> str | None:
    """Mask credentials embedded in a URI (`scheme://user:secret@host/...`)."""
    if not uri or "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    netloc, sep, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{sep}{path}"


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {key}: {p} is not a mapping")
        node = child
    node[leaf] = value


# --- CLI flag mapping ----------------------------------------------------------------------------------------------
# (flag, dotted config key, type, help). Help strings stay short; the field descriptions carry the details.
CLI_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--input", "input", str, "input Parquet file, directory or glob (local, file://, s3://)"),
    ("--output", "output", str, "output directory (local, file://, s3://)"),
    ("--model", "model", str, "model directory (local or s3://)"),
    ("--prompt-column", "prompt_column", str, "column with plain-text prompts"),
    ("--messages-column", "messages_column", str, "column with chat messages"),
    ("--id-column", "id_column", str, "column with unique row ids (default: derived from file and row)"),
    ("--sampling-params-column", "sampling_params_column", str, "column with per-row sampling overrides"),
    ("--carry-columns", "carry_columns", "csv", "comma-separated input columns to copy to the output ('' = none)"),
    ("--max-tokens", "sampling.max_tokens", int, "maximum generated tokens per row"),
    ("--temperature", "sampling.temperature", float, "sampling temperature (0 = greedy)"),
    ("--top-p", "sampling.top_p", float, "nucleus sampling mass"),
    ("--top-k", "sampling.top_k", int, "top-k (-1 = off)"),
    ("--seed", "sampling.seed", int, "sampling seed"),
    ("--stop", "sampling.stop", "list", "stop string (repeatable)"),
    ("--device", "device", str, "cuda (request GPUs) or cpu"),
    ("--tensor-parallel-size", "tensor_parallel_size", int, "GPUs per replica"),
    ("--num-replicas", "num_replicas", int, "engine replicas to start with (the minimum)"),
    ("--max-replicas", "max_replicas", int, "autoscale the replica pool up to this many"),
    ("--resource-timeout", "resource_timeout_s", float, "seconds to wait for replica resources"),
    ("--replica-num-cpus", "replica_num_cpus", float, "CPUs reserved per replica (fractions allowed)"),
    ("--batch-size", "batch_size", int, "rows per engine call"),
    ("--batches-in-flight", "batches_in_flight", int, "batches each replica works on at once"),
    ("--dtype", "engine.dtype", str, "engine dtype"),
    ("--engine-device", "engine.device", str, "torch device override (default: follows --device)"),
    ("--max-model-len", "engine.max_model_len", int, "context length"),
    ("--max-num-seqs", "engine.max_num_seqs", int, "engine: max concurrent sequences"),
    ("--max-error-fraction", "max_error_fraction", float, "largest tolerated fraction of error rows"),
    ("--rows-per-file", "rows_per_file", int, "target rows per output file"),
    ("--read-rows-per-task", "read_rows_per_task", int, "rows per read task"),
    ("--no-prefix-aware", "prefix_aware", "false", "do not order rows by prompt prefix"),
    ("--overwrite", "overwrite", "true", "delete the output directory first"),
    ("--keep-checkpoint", "keep_checkpoint", "true", "keep the checkpoint after success"),
    ("--endpoint-url", "storage.endpoint_url", str, "S3 endpoint URL"),
    ("--model-cache-dir", "model_cache_dir", str, "node-local model cache directory"),
    ("--ray-address", "ray_address", str, "Ray address for ray.init"),
    ("--progress-interval", "progress_interval_s", float, "seconds between progress lines"),
]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML job file; flags override its values")
    for flag, key, typ, help_ in CLI_FLAGS:
        dest = "opt__" + key.replace(".", "__")
        if typ == "true":
            parser.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=help_)
        elif typ == "false":
            parser.add_argument(flag, dest=dest, action="store_const", const=False, default=None, help=help_)
        elif typ == "list":
            parser.add_argument(flag, dest=dest, action="append", default=None, help=help_)
        elif typ == "csv":
            parser.add_argument(flag, dest=dest, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    parser.add_argument(
        "--set",
        dest="set_",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config field by dotted key, value parsed as YAML (e.g. --set engine.block_size=32)",
    )


def config_from_args(args: argparse.Namespace) -> BatchJobConfig:
    """Build the config from parsed CLI arguments: the --config file, then flags, then --set."""
    overrides: dict[str, Any] = {}
    for flag, key, typ, _ in CLI_FLAGS:
        value = getattr(args, "opt__" + key.replace(".", "__"))
        if value is None:
            continue
        if typ == "csv":
            value = [c.strip() for c in value.split(",") if c.strip()]
        overrides[key] = value
    for item in args.set_:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw)
    if args.config:
        return BatchJobConfig.from_yaml(args.config, **overrides)
    data: dict[str, Any] = {}
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return BatchJobConfig.model_validate(data)


__all__ = [
    "BatchJobConfig",
    "EngineOptions",
    "SamplingDefaults",
    "StorageOptions",
    "CLI_FLAGS",
    "add_cli_arguments",
    "config_from_args",
    "join_uri",
    "redact_uri",
]
