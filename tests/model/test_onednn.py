"""CPU linears packed for oneDNN compute what F.linear computes, for every layer kind, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from glm4.layers import onednn
from glm4.layers.linear import PackableLinear
from glm4.weights import load_model

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN linear kernels")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_packed_model_matches_dense(tiny_checkpoint, dtype, tol):
    dense = load_model(tiny_checkpoint, dtype=dtype)
    packed = load_model(tiny_checkpoint, dtype=dtype)
    linears = [m for m in packed.modules() if isinstance(m, PackableLinear)]
    # qkv, dense, dense_h_to_4h, dense_4h_to_h per layer, and the LM head
    assert packed.pack_for_cpu() == len(linears) == 4 * packed.config.num_layers + 1
    assert all(m.weight.numel() == 0 for m in linears)  # one copy of the weights, not two
    assert packed.pack_for_cpu() == 0  # idempotent
    ids = torch.randint(0, packed.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(ids).float(), packed(ids).float()
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_shapes_bias_and_fallback():
    torch.manual_seed(0)
    layer = PackableLinear()
    layer.weight = torch.nn.Parameter(torch.randn(24, 16), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(24), requires_grad=False)
    xs = [torch.randn(16), torch.randn(5, 16), torch.randn(2, 3, 16), torch.randn(16, 5).t(), torch.randn(0, 16)]
    want = [torch.nn.functional.linear(x, layer.weight, layer.bias) for x in xs]
    assert layer.pack_for_cpu()
    for x, w in zip(xs, want):
        torch.testing.assert_close(layer.matmul(x), w, atol=1e-5, rtol=0)
    half = PackableLinear()
    half.weight = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float16), requires_grad=False)
    assert not half.pack_for_cpu() and half.packed_weight is None  # unsupported dtype: stays on F.linear
    assert half.matmul(torch.randn(2, 4, dtype=torch.float16)).shape == (2, 8)
