"""EngineConfig: dtype as a name or a torch.dtype (kept as the name), a clear error for anything else."""

from __future__ import annotations

import pytest
import torch

import glm4
from glm4.engine.engine_config import EngineConfig


@pytest.mark.parametrize("given,name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
                                        (torch.float32, "float32"), ("bfloat16", "bfloat16"), (None, None)])
def test_dtype_name_or_torch_dtype(given, name):
    assert EngineConfig.from_kwargs(dtype=given).dtype == name


@pytest.mark.parametrize("bad", [torch.int8, torch.float64, "fp8", "torch.bfloat16", 16])
def test_bad_dtype_is_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match=r"dtype must be one of float32, bfloat16, float16 \(the name or the "
                                         r"torch.dtype\), got"):
        EngineConfig.from_kwargs(dtype=bad)


def test_llm_takes_a_torch_dtype(tiny_checkpoint):
    llm = glm4.LLM(tiny_checkpoint, dtype=torch.float32, device="cpu", max_num_seqs=2)
    try:
        assert llm.engine.executor.dtype is torch.float32
        out = llm.generate([[5, 6, 7]], glm4.SamplingParams(temperature=0, max_tokens=3))[0]
        assert out.finish_reason in ("stop", "length") and out.error is None
    finally:
        llm.shutdown()
