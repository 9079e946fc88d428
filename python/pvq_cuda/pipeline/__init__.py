"""Layer 5 of pvq_cuda: quantize_model / quantize_models, block-by-block (GPTQ-style) quantization
of decoder-only causal LMs with dense blocks (Llama, Mistral, Qwen2/3, Phi-3, Gemma-2/3, OLMo-2).
Imports the layers below (quantization, layers, format, ops).

The pipeline (paper.md §6, the order GPTQ uses):

1. Run the calibration tokens through the embeddings and catch the inputs of decoder block 0
   (hidden states) and every block's other arguments (position embeddings, attention mask, ...:
   blocks of another layer type, e.g. Gemma's sliding-window ones, get their own), with every
   block standing in as a stub for that one forward (``capture.block_inputs``).
2. For each block, for each sequential group of its linears (q/k/v → o → gate/up → down, in the
   order its forward calls them): make the group's inputs on every calibration chunk, with the
   group's earlier layers already quantized, accumulate the group's Hessian from them and
   quantize each layer of the group. Later groups therefore see the already quantized earlier
   ones. A Llama-style block (one that passes ``llama.LlamaFlow.probe``, checked once per kind of
   block) is run in stages so that nothing is computed twice; any other block is run up to the
   group with a HessianCollector on it, the forward stopping as soon as every layer of the group
   has seen its input.
3. The finished block's outputs on its inputs are the next block's inputs. Only one block's
   activations (and its intermediate ones) are held at a time.

With ``fp_targets`` the unquantized model runs beside it (one more forward of each block, on its
own stream of activations), and each layer is quantized toward the output the fp model gives,
not the output its unquantized weight gives on the already-perturbed inputs (see
:func:`fp_target_weight`). :func:`quantize_models` runs several copies of one model together,
block by block, and makes that fp pass once for all of them.

Baselines (RTN, GPTQ, rotated GPTQ) run through the same pipeline (pvq_cuda.quantization.methods).
Data-free methods (``pvq-datafree``, ``rtn-*``) need no activations and skip steps 1–3.

Modules, one job each: ``api`` (the entry points and their checks), ``run`` (one run's state and
its per-layer step), ``calibration`` (token chunks), ``resume`` (per-block checkpoints),
``capture`` (hooks that catch activations), ``groups`` (which linears go together), ``llama``
(staged Llama blocks), ``generic`` (any other block), ``stream`` (activations carried block by
block, one run or several in lockstep), ``tune`` (training a block's linears not yet quantized
between its groups, ``tune_epochs``), ``allocate`` (``bpw``), ``finetune`` (the scales after coding).
"""

from .api import PER_RUN_OPTIONS, quantize_model, quantize_models, uses_fp_targets
from .finetune import finetune_scales, sample_windows
from .run import LOSS_DEFINITION, fp_target_weight

__all__ = ["LOSS_DEFINITION", "PER_RUN_OPTIONS", "finetune_scales", "fp_target_weight", "quantize_model", "quantize_models",
           "sample_windows", "uses_fp_targets"]
