"""The planned LoRA node over a bitsandbytes 4-bit base (QLoRA): the 4-bit runner.

QLoRA keeps the frozen base weight as 4-bit codes (nf4 or fp4) with one absmax per block, itself 8-bit quantized
under double quantization (`compress_statistics`). bitsandbytes' `Linear4bit` casts x to its compute dtype,
dequantizes the whole weight, multiplies, and casts the result back; its backward dequantizes again for dX. The
planner treats that dequantized weight like any other intermediate (`Program.keep_deq`: keep it from forward, or
dequantize again), so the same executor and the same custom autograd node run dense and 4-bit sites.

The dequantize step (`kernels.bnb`) reproduces bitsandbytes' own `gemm_4bit` dequantization bit for bit, so a
planned site computes exactly what the stock layer does. The packed weight stays a parameter; the only
full-precision copy that outlives a step is the one a plan saves for backward (``Wd`` in its saved set, shown by
`Plan`, `explain` and the program key ``...+wd``), and it lives until backward, never in the model.

`QLoraLinearRunner` is a `LoraLinearRunner` whose hooks describe a 4-bit base: (out, in) and the format come from
the quant state, the site's dtype is the input's, and the quant state reaches the steps as the constant "qs".
The runner holds the `QuantState` object (bitsandbytes updates it in place, and so does a ReLoRA merge), so every
call reads the current state; compiled graphs reach the runner by its site id (`kernels.ops.register_site`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..planner.expr import QuantSpec
from ..planner.search import SearchOptions
from .bnb import PACKED_FOR_CPU_REASON, bnb_inference_path, is_packed_for_cpu, quant_spec_of
from .dense import AdapterConfig, LoraLinearRunner

class QLoraLinearRunner(LoraLinearRunner):
    """`LoraLinearRunner` for a site whose base is a bitsandbytes `Linear4bit`.

    Called like the dense runner, with the packed `Params4bit` as the weight: ``runner(x, W4, b, adapters,
    training)``. `compute_dtype` is the dtype bitsandbytes computes the base in; `input_dtype` the dtype of x
    (and of the site's result) it was planned for. The bias, if any, is in the compute dtype (bitsandbytes casts
    it there on its first call).
    """

    def __init__(self, adapters: tuple[AdapterConfig, ...], options: SearchOptions, quant_state: Any,
                 compute_dtype: torch.dtype, input_dtype: torch.dtype):
        super().__init__(adapters, options)
        if quant_state is None or len(getattr(quant_state, "shape", ())) != 2:
            raise ValueError("a 4-bit site needs the bitsandbytes QuantState of a 2-D weight")
        self.quant_state = quant_state
        self.compute_dtype = compute_dtype
        self.input_dtype = input_dtype
        quant_spec_of(quant_state, compute_dtype)  # validates the format early

    def base_shape(self, weight: torch.Tensor) -> tuple[int, int]:
        o, i = self.quant_state.shape
        return int(o), int(i)

    def base_dtype(self, weight: torch.Tensor) -> torch.dtype:
        return self.input_dtype

    def quant_spec(self) -> QuantSpec:
        return quant_spec_of(self.quant_state, self.compute_dtype)

    def constants(self) -> dict[str, Any]:
        return {"qs": self.quant_state}

    def check_base(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        o, i = self.base_shape(weight)
        if is_packed_for_cpu(self.quant_state):
            raise ValueError(PACKED_FOR_CPU_REASON)
        if weight.numel() * weight.element_size() * 2 < o * i:
            raise ValueError(f"the packed 4-bit weight has {weight.numel() * weight.element_size()} bytes, too few "
                             f"for a {o}x{i} weight")
        if x.shape[-1] != i:
            raise ValueError(f"input has {x.shape[-1]} features but the 4-bit base weight expects {i}")
        if x.dtype != self.input_dtype:
            raise ValueError(f"input dtype {x.dtype} differs from the dtype {self.input_dtype} this 4-bit site was "
                             "planned for")
        if bias is not None and (tuple(bias.shape) != (o,) or bias.dtype != self.compute_dtype):
            raise ValueError(f"the 4-bit base's bias must be ({o},) in the compute dtype {self.compute_dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")

    def accepts(self, x: torch.Tensor, weight: torch.Tensor, module: nn.Module | None = None) -> bool:
        _, i = self.base_shape(weight)
        return (x.dtype == self.input_dtype and x.dim() >= 1 and x.shape[-1] == i
                and not is_packed_for_cpu(self.quant_state) and not bnb_inference_path(module, weight, x))
