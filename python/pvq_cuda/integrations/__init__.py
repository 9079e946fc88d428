"""Layer 6 of pvq_cuda: integrations with other frameworks (transformers, PEFT, lm-eval).

An integration sits on top of the library and never inside it: it may import every layer below
(pipeline, quantization, layers, format, ops); nothing below imports it. Applications (the CLI)
sit above.
"""

import importlib.util


def register_all() -> None:
    """Register pvq_cuda with the frameworks that are installed (called by ``import pvq_cuda``)."""
    if importlib.util.find_spec("transformers") is not None:
        import transformers.quantizers

        if hasattr(transformers.quantizers, "register_quantizer"):  # transformers 4.50 and later
            from . import huggingface

            huggingface.register()
