"""Layer 3 of pvq_cuda: PVQLinear, the drop-in nn.Linear, and how PVQ layers go into a causal LM
and its checkpoint directory. Imports only the format and ops layers."""

from .decoder import decoder_layers, linears, set_submodule
from .linear import PVQLinear, register_weight_quantizer
from .quantized_model import (load_quantized, make_save_pretrained_atomic, model_quantization_config, save_quantized,
                              set_activation_coding)

__all__ = ["PVQLinear", "decoder_layers", "linears", "load_quantized", "model_quantization_config",
           "make_save_pretrained_atomic", "register_weight_quantizer", "save_quantized", "set_activation_coding",
           "set_submodule"]
