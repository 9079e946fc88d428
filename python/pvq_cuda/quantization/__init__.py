"""Layer 4 of pvq_cuda: quantization algorithms for one weight at a time.

``quantize_weight`` (data-free or Hessian-aware PVQ), GPTQ/LDLQ error feedback, the Hessian
collector, the RTN/GPTQ baselines, and the method registry that quantizes one nn.Linear by name.
Imports only the layers, format and ops layers.
"""

from ..layers.linear import register_weight_quantizer
from .baselines import BASELINE_BITS, BASELINES, baseline_bpw, gptq_quantize, rtn_quantize
from .error_feedback import error_feedback, hessian_loss, inverse_cholesky_upper
from .hessian import DEFAULT_DAMP, HessianCollector, collect_hessians, damp_hessian, rotate_hessian
from .methods import Method, parse_method, quantize_linear
from .quantize import quantize_weight

# PVQLinear.from_linear quantizes data-free with quantize_weight (see layers/linear.py).
register_weight_quantizer(quantize_weight)

__all__ = ["BASELINES", "BASELINE_BITS", "DEFAULT_DAMP", "HessianCollector", "Method", "baseline_bpw",
           "collect_hessians", "damp_hessian", "error_feedback", "gptq_quantize", "hessian_loss",
           "inverse_cholesky_upper", "parse_method", "quantize_linear", "quantize_weight", "rotate_hessian",
           "rtn_quantize"]
