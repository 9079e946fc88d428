"""Layer 6 of pvq_cuda: integrations with other frameworks (transformers, PEFT, lm-eval).

An integration sits on top of the library and never inside it: it may import every layer below
(pipeline, quantization, layers, format, ops); nothing below imports it. Applications (the CLI)
sit above.
"""

import importlib.util

import wrapt


def register_all() -> None:
    """Register pvq_cuda with the frameworks that are installed (called by ``import pvq_cuda``).

    transformers is registered with at once (its registry must know "pvq" before from_pretrained
    reads a config); PEFT when it is first imported, so that ``import pvq_cuda`` does not pay for
    importing it: the hook runs at once if it is already imported."""
    if importlib.util.find_spec("peft") is not None:
        wrapt.register_post_import_hook("pvq_cuda.integrations.peft_lora:install", "peft")
    if importlib.util.find_spec("transformers") is not None:
        import transformers.quantizers

        if hasattr(transformers.quantizers, "register_quantizer"):  # transformers 4.50 and later
            from . import huggingface

            huggingface.register()
