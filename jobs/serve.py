"""``glm4-serve``: run the OpenAI-compatible endpoint on Ray Serve.

    glm4-serve --model /models/glm-4-9b-chat --host 0.0.0.0 --port 8000 --num-replicas 2 --num-gpus 1
    GLM4_API_KEY=secret glm4-serve --model DIR            # bearer auth from the environment
    glm4-serve --model DIR --address auto --detach       # deploy onto a running cluster and return

Without ``--detach`` the command serves until SIGINT/SIGTERM, then shuts Serve down. ``main()`` returns the exit
code: 0 on a clean stop, 2 for bad arguments, 1 when the deployment failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline.serve.config import API_KEY_ENV  # light: pydantic only, no Ray at argument parsing


def _engine_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)  # numbers, true/false/null, JSON strings
    except json.JSONDecodeError:
        value = {"True": True, "False": False, "None": None}.get(raw, raw)
    return key.strip(), value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="glm4-serve", description="OpenAI-compatible GLM-4 endpoint on Ray Serve.")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--served-model-name", default=None, help="name clients send as `model` (default: dir name)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--app-name", default="glm4")
    p.add_argument("--route-prefix", default="/")
    p.add_argument("--address", default=None,
                   help="Ray cluster address ('auto', 'ray://...'); default: RAY_ADDRESS or a new local cluster")
    p.add_argument("--detach", action="store_true", help="deploy and return (needs a long-lived cluster)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: env {API_KEY_ENV})")
    g = p.add_argument_group("replicas and resources")
    g.add_argument("--num-replicas", type=int, default=1)
    g.add_argument("--min-replicas", type=int, default=None, help="turn on autoscaling (with --max-replicas)")
    g.add_argument("--max-replicas", type=int, default=None)
    g.add_argument("--target-ongoing-requests", type=float, default=None, help="autoscaling target per replica")
    g.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (fractional is fine)")
    g.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (tensor-parallel-size 1)")
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g = p.add_argument_group("admission control (per replica)")
    g.add_argument("--max-ongoing-requests", type=int, default=64, help="requests generating at once")
    g.add_argument("--max-queued-requests", type=int, default=64, help="requests waiting; past it: 429")
    g.add_argument("--retry-after-s", type=float, default=1.0)
    g.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask for")
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--kv-cache-memory", type=float, default=None, help="bytes (>1) or fraction of free memory")
    g.add_argument("--model-cache-dir", default=None, help="node-local cache for s3:// models")
    g.add_argument("--engine-option", type=_engine_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any other AsyncLLMEngine option, repeatable (e.g. block_size=32)")
    p.add_argument("--access-log", action="store_true", help="Serve's per-request access log")
    return p.parse_args(argv)


def build_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The ``build_app`` args for the parsed command line (the same keys a Serve config's ``args`` take)."""
    args: dict[str, Any] = {
        "model": ns.model if "://" in ns.model else str(Path(ns.model).expanduser().resolve()),
        "num_replicas": ns.num_replicas,
        "num_cpus": ns.num_cpus,
        "num_gpus": ns.num_gpus,
        "tensor_parallel_size": ns.tensor_parallel_size,
        "max_ongoing_requests": ns.max_ongoing_requests,
        "max_queued_requests": ns.max_queued_requests,
        "retry_after_s": ns.retry_after_s,
        "enable_access_log": ns.access_log,
        "engine_options": dict(ns.engine_option),
    }
    api_key = ns.api_key if ns.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key:
        args["api_key"] = api_key
    for key in ("served_model_name", "model_cache_dir", "max_tokens_limit", "dtype", "device", "max_model_len",
                "max_num_seqs", "kv_cache_memory"):
        value = getattr(ns, key)
        if value is not None:
            args[key] = value
    if ns.min_replicas is not None or ns.max_replicas is not None:
        auto: dict[str, Any] = {"min_replicas": ns.min_replicas if ns.min_replicas is not None else 1,
                                "max_replicas": ns.max_replicas if ns.max_replicas is not None else ns.num_replicas}
        if ns.target_ongoing_requests is not None:
            auto["target_ongoing_requests"] = ns.target_ongoing_requests
        args["autoscaling_config"] = auto
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        ns = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    remote = ns.model.startswith(("s3://", "s3a://", "file://"))
    if not remote and not Path(ns.model).expanduser().is_dir():
        print(f"glm4-serve: --model {ns.model!r} is not a directory (or an s3:// / file:// URI)", file=sys.stderr)
        return 2
    args = build_args(ns)
    from pydantic import ValidationError

    from pipeline.serve.app import ServeArgs

    try:
        ServeArgs.model_validate(args)
    except ValidationError as e:
        print(f"glm4-serve: invalid arguments:\n{e}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from pipeline.serve.app import build_app

    stop = threading.Event()
    try:
        if not ray.is_initialized():
            ray.init(address=ns.address, include_dashboard=False)
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve.run(build_app(args), name=ns.app_name, route_prefix=ns.route_prefix)
    except Exception as e:  # deployment failed (bad checkpoint, no resources, port taken)
        print(f"glm4-serve: deployment failed: {e}", file=sys.stderr)
        return 1
    url = f"http://{ns.host}:{ns.port}{ns.route_prefix.rstrip('/')}/v1"
    print(f"glm4-serve: serving {args.get('served_model_name') or Path(args['model']).name!r} at {url}", flush=True)
    if ns.detach:
        return 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("glm4-serve: shutting down", flush=True)
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
