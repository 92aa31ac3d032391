"""GLM-4-9B in pure PyTorch: model, tokenizer, checkpoint loading and an inference engine. Never imports Ray."""

from __future__ import annotations

from typing import Any

from glm4.config import GLM4Config

__version__ = "0.1.0"

# Heavier submodules load on first use so `import glm4` stays cheap for CPU-only pipeline stages.
_LAZY = {
    "load_model": ("glm4.weights", "load_model"),
    "CheckpointError": ("glm4.weights", "CheckpointError"),
    "GLM4ForCausalLM": ("glm4.model", "GLM4ForCausalLM"),
    "load_tokenizer": ("glm4.tokenizer", "load_tokenizer"),
    "GLM4Tokenizer": ("glm4.tokenizer", "GLM4Tokenizer"),
    "SamplingParams": ("glm4.engine.sampling_params", "SamplingParams"),
    "LLM": ("glm4.engine.llm", "LLM"),
    "LLMEngine": ("glm4.engine.llm_engine", "LLMEngine"),
    "AsyncLLMEngine": ("glm4.engine.async_engine", "AsyncLLMEngine"),
    "RequestOutput": ("glm4.engine.outputs", "RequestOutput"),
    "CompletionOutput": ("glm4.engine.outputs", "CompletionOutput"),
}

__all__ = ["GLM4Config", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'glm4' has no attribute {name!r}")
