"""Layer 6 of pvq_cuda: integrations with other frameworks (transformers, PEFT, lm-eval).

An integration sits on top of the library and never inside it: it may import every layer below
(pipeline, quantization, layers, format, ops); nothing below imports it. Applications (the CLI)
sit above.
"""
