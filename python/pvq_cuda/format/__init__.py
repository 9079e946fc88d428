"""Layer 2 of pvq_cuda: what a quantized weight is and how it is stored.

Config and presets, gain levels, PVQWeight (packing, dequantization and its matmul), the file
container (safetensors with checksums), atomic writes and the checkpoint directory. Imports only
the ops layer.
"""

from .activation import (ACT_PRESETS, ActivationCodes, ActivationConfig, activation_levels, code_activations,
                         wa_matmul)
from .config import DEFAULT_PRESET, PRESETS, PVQConfig
from .container import FORMAT_VERSION, FormatError, load, read_metadata, register_serializable, save
from .gain import beta_gain_levels
from .weight import TILE_ROWS, PVQWeight, pvq_matmul, rotation_signs, stored_bits

__all__ = ["ACT_PRESETS", "ActivationCodes", "ActivationConfig", "DEFAULT_PRESET", "FORMAT_VERSION", "FormatError",
           "PRESETS", "PVQConfig", "PVQWeight", "TILE_ROWS", "activation_levels", "beta_gain_levels",
           "code_activations", "load", "pvq_matmul", "read_metadata", "register_serializable", "rotation_signs",
           "save", "stored_bits", "wa_matmul"]
