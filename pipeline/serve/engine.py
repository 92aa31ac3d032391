"""A replica's engine: loading it from the app args, and the facts the server needs from it (tokenizer, context
length). Engines are pluggable (``ServeArgs.engine_cls``), so those facts are looked up in the places different
engines keep them, with the checkpoint itself as the last resort.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pipeline.serve.config import ServeArgs


def _import_obj(path: str) -> Any:
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"expected 'package.module:Name', got {path!r}")
    return getattr(importlib.import_module(module), name)


def _find_attr(obj: Any, paths: list[str]) -> Any:
    for path in paths:
        cur = obj
        for part in path.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


def load_engine(args: ServeArgs, model_dir: Path) -> Any:
    cls = _import_obj(args.engine_cls)
    return cls.from_pretrained(str(model_dir), **args.resolved_engine_options())


def engine_tokenizer(engine: Any, model_dir: Path) -> Any:
    """The engine's tokenizer, or the checkpoint's when the engine does not expose one."""
    tokenizer = _find_attr(engine, ["tokenizer", "engine.tokenizer", "llm_engine.tokenizer"])
    if tokenizer is None:
        from glm4.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
    return tokenizer


def engine_max_model_len(engine: Any, args: ServeArgs, model_dir: Path) -> int:
    """The context length the engine runs with: its own setting, else the args', else the model's."""
    value = _find_attr(engine, ["max_model_len", "engine.max_model_len", "llm_engine.max_model_len",
                                "engine.scheduler.max_model_len", "scheduler.max_model_len",
                                "config.max_model_len"])
    if value is None:
        value = args.resolved_engine_options().get("max_model_len")
    if value is None:
        config = _find_attr(engine, ["model_config", "engine.model_config", "config", "engine.config"])
        value = getattr(config, "max_position_embeddings", None)
    if value is None:
        from glm4.config import GLM4Config

        value = GLM4Config.from_json(model_dir / "config.json").max_position_embeddings
    return int(value)
