"""bitsandbytes helpers, and the ``dequantize`` step op (registered in `planner.ops` on import).

A leaf of the kernels layer: it imports only the planner, and bitsandbytes itself only when a 4-bit step runs
(`_ops`), so importing the package never imports bitsandbytes. `dequantize` reproduces bitsandbytes' own
`gemm_4bit` dequantization bit for bit (same ops, same order).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..planner.expr import QuantSpec
from ..planner.ops import StepOp, register

PACKED_FOR_CPU_REASON = ("bitsandbytes repacked this 4-bit weight for its fused CPU inference kernel (eval mode, "
                         "input without grad, AVX512-bf16); bitsandbytes runs it")


def _ops() -> Any:
    """torch.ops.bitsandbytes, with bitsandbytes imported (its import registers the ops)."""
    import bitsandbytes  # noqa: F401

    return torch.ops.bitsandbytes


def is_packed_for_cpu(state: Any) -> bool:
    """Whether bitsandbytes has converted the weight to its CPU inference layout (absmax bf16, codes reordered)."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def absmax(state: Any) -> torch.Tensor:
    """The fp32 per-block absmax, decoded from its 8-bit form under double quantization (as gemm_4bit does)."""
    if not state.nested:
        return state.absmax
    ops = _ops()
    decoded = ops.dequantize_blockwise.default(state.absmax, state.state2.absmax, state.state2.code,
                                               state.state2.blocksize, torch.float32)
    return decoded + state.offset


def dequantize(packed: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The dense (out x in) weight in `dtype`, computed exactly as bitsandbytes' `gemm_4bit` computes it."""
    if is_packed_for_cpu(state):
        raise RuntimeError(f"cannot dequantize: {PACKED_FOR_CPU_REASON}")
    return _ops().dequantize_4bit.default(packed.reshape(-1, 1), absmax(state), state.blocksize, state.quant_type,
                                          list(state.shape), dtype)


def quant_spec_of(state: Any, compute_dtype: torch.dtype) -> QuantSpec:
    """The planner's view of a bitsandbytes `QuantState`."""
    return QuantSpec(str(state.quant_type), int(state.blocksize), bool(state.nested), compute_dtype)


def bnb_inference_path(module: nn.Module | None, weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether bitsandbytes' `Linear4bit.forward` would switch to its fused CPU inference kernel for this call
    (and repack the weight for it): CPU with AVX512-bf16, the base in eval mode, x without grad."""
    if module is None or x.device.type != "cpu":
        return False
    if hasattr(module, "get_base_layer"):
        base = module.get_base_layer()
    else:
        base = next((m for m in module.modules() if getattr(m, "weight", None) is weight), module)
    return bool(getattr(base, "support_avx512bf16_for_cpu", False)) and not base.training and not x.requires_grad


register(StepOp(  # a 4-bit weight and its quant state to a dense weight in `dtype`
    "dequantize",
    formula=lambda s: f"dequantize_4bit({s.args[0]}, {s.args[1]}).to({str(s.dtype).replace('torch.', '')})",
    emit=lambda em, s, a: em.call(dequantize, a[0], a[1], s.dtype),
    pricing="throughput", rate="dequantize_rate"))
