"""A linear layer that trains through the rounding its quantized form will apply.

Quantization-aware training replaces each layer a recipe quantizes with `FakeQuantLinear`: the
float weight stays the trained parameter, and every forward uses it quantized then dequantized with
the very spec the quantized layer will use (optionally activations too, per token, as dynamic W8A8
does). Rounding's gradient is taken as the identity (the straight-through estimator), so the
weights learn to sit where rounding hurts least. `to_linear` hands back a plain nn.Linear with the
trained weight; quantizing that with the same spec gives exactly the weights the model trained with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.quant import QuantSpec, fake_quantize


class _PerTokenRoundTrip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, qmax: int) -> torch.Tensor:
        scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.round(x / scale).clamp_(-qmax, qmax) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric codes -(2^(b-1)-1)..2^(b-1)-1 with one scale per token (max|x| maps to the top code)."""
    return _PerTokenRoundTrip.apply(x, 2 ** (bits - 1) - 1)


class FakeQuantLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, weight_spec: QuantSpec,
                 activation_bits: int | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_spec = weight_spec
        self.activation_bits = activation_bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_spec: QuantSpec, activation_bits: int | None = None):
        """A fake-quant layer sharing `linear`'s parameters (nothing is copied)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_spec,
                    activation_bits, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.weight_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits is not None:
            x = fake_quantize_per_token(x, self.activation_bits)
        return F.linear(x, self.quantized_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        acts = f", activations int{self.activation_bits} per token" if self.activation_bits else ""
        return f"{super().extra_repr()}, weights {self.weight_spec}{acts}"
