"""quantize_model beyond Llama: tiny random Qwen2, Qwen3, Mistral, Phi-3, Gemma-2, Gemma-3 and OLMo-2
models (tests/tiny_arches.py; CPU, offline) are quantized, checked against their dense dequantized
twins, saved, loaded and loaded again by transformers; mixture-of-experts models and widths the
codes cannot take are refused by name before any work."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import pvq_cuda  # noqa: E402
from pvq_cuda.layers import set_submodule  # noqa: E402
from pvq_cuda.pipeline.capture import block_inputs, first  # noqa: E402
from pvq_cuda.pipeline.llama import LlamaFlow  # noqa: E402
from tiny_arches import ARCHITECTURES, SEQLEN, VOCAB, staged_by_probe, tiny_arch_model  # noqa: E402
from tiny_llama import logits, quantize_quietly, random_ids, tiny_model  # noqa: E402

# The fused kernel (pvq_matmul) rotates the activations and sums in another order than a dense
# GEMM on the dequantized weight: fp32 rounding, measured at most 8e-7 on these models' logits
# (|logits| <= 1.5), so 1e-5 leaves a 10x margin and still catches any real difference.
FUSED_ATOL = FUSED_RTOL = 1e-5


def _ids(n, seed):
    return random_ids(n, SEQLEN, seed)


def _quantize(model, **kw):
    return quantize_quietly(model, _ids(8, 1), **kw)


def _linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def quantized(request):
    """(architecture, its quantized model, the log, the names of its linears before quantization);
    with fp targets, as the CLI quantizes, so that the fp model's pass runs too."""
    name = request.param
    model = tiny_arch_model(name)
    names = _linear_names(model)
    log = _quantize(model, fp_targets=True)
    return name, model, log, names


def test_every_linear_is_quantized_or_named_as_kept(quantized):
    name, model, log, names = quantized
    done = {e["name"] for e in log["layers"]}
    kept = set(log["kept"])
    assert done | (kept & names) == names and not done & kept
    assert {n for n, m in model.named_modules() if isinstance(m, pvq_cuda.PVQLinear)} == done
    assert all(n.startswith("model.layers.") for n in done)
    assert kept == {"lm_head", "model.embed_tokens"}
    tied = model.config.tie_word_embeddings
    assert ("tied to model.embed_tokens" in log["kept"]["lm_head"]) == tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    expected = 8 if name == "phi3" else 14  # Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj per block
    assert len(done) == expected and all(0 < e["loss"] < 0.1 for e in log["layers"])


def test_staged_path_only_where_the_probe_passes(quantized, monkeypatch):
    """Llama-shaped blocks (Qwen2, Qwen3, Mistral) take the staged path, the others the generic
    one; where the probe passes, the staged run quantizes exactly as the generic path does."""
    name, model, log, _ = quantized
    assert {e["path"] for e in log["layers"]} == {"staged" if staged_by_probe(name) else "generic"}
    block = tiny_arch_model(name).model.layers[0]
    fresh = tiny_arch_model(name)
    h, extras = block_inputs(fresh, fresh.model.layers, _ids(2, 3))
    with torch.no_grad():
        assert LlamaFlow.probe(block, h, lambda: block(h, *extras[0][0], **extras[0][1])) == staged_by_probe(name)
    if staged_by_probe(name):
        monkeypatch.setattr(LlamaFlow, "probe", classmethod(lambda cls, *a: False))
        generic = tiny_arch_model(name)
        generic_log = _quantize(generic, fp_targets=True)
        assert {e["path"] for e in generic_log["layers"]} == {"generic"}
        ids = _ids(3, 9)
        assert torch.equal(logits(model, ids), logits(generic, ids))
        assert [e["loss"] for e in log["layers"]] == [e["loss"] for e in generic_log["layers"]]


def test_groups_follow_the_forward_order(quantized):
    """Layers are quantized in the order the block's forward calls them: Phi-3 declares o_proj
    before qkv_proj, but qkv_proj goes first."""
    name, _, log, _ = quantized
    order = [e["name"].split(".", 3)[3] for e in log["layers"] if e["block"] == 0]
    if name == "phi3":
        assert order == ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    else:
        assert order == [f"self_attn.{p}_proj" for p in "qkvo"] + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_logits_equal_the_dense_dequantized_twin(quantized):
    """The quantized model computes what a dense model holding the dequantized weights computes:
    bit for bit where both run the same dense GEMM (PVQLinear's decoded-weight cache), within fp32
    rounding through the fused kernel."""
    _, model, _, _ = quantized
    twin = copy.deepcopy(model)
    for n, m in list(twin.named_modules()):
        if isinstance(m, pvq_cuda.PVQLinear):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(m.weight.dequantize())
                if m.bias is not None:
                    dense.bias.copy_(m.bias)
            set_submodule(twin, n, dense)
    assert not any(isinstance(m, pvq_cuda.PVQLinear) for m in twin.modules())
    ids = _ids(3, 5)
    expected = logits(twin, ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=FUSED_ATOL, rtol=FUSED_RTOL)
    layers = [m for m in model.modules() if isinstance(m, pvq_cuda.PVQLinear)]
    try:
        for m in layers:
            m.enable_decoded_cache()
        assert torch.equal(logits(model, ids), expected)
    finally:
        for m in layers:
            m.disable_decoded_cache()
    assert not torch.equal(expected, logits(tiny_arch_model(quantized[0]), ids))  # quantization did something


def test_save_load_and_from_pretrained_give_the_same_logits(quantized, tmp_path):
    from transformers import AutoModelForCausalLM

    name, model, _, _ = quantized
    out = pvq_cuda.save_quantized(model, tmp_path / name)
    ids = _ids(2, 7)
    expected = logits(model, ids)
    loaded = pvq_cuda.load_quantized(out)
    assert torch.equal(logits(loaded, ids), expected)
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(hf) is type(model)
    assert {n for n, m in hf.named_modules() if isinstance(m, pvq_cuda.PVQLinear)} == \
        {n for n, m in model.named_modules() if isinstance(m, pvq_cuda.PVQLinear)}
    assert torch.equal(logits(hf, ids), expected)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert hf.lm_head.weight is hf.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["gemma3", "qwen2"])
def test_each_block_gets_its_own_mask_and_rotary_embedding(name):
    """Blocks of different layer types get their own arguments (Gemma-3's sliding and full layers:
    masks and rotary embeddings; Qwen2's: masks): run block by block on what block_inputs caught,
    the model reproduces its own hidden states, which block 0's arguments would not."""
    model = tiny_arch_model(name)
    ids = _ids(2, 11)
    with torch.no_grad():
        h, extras = block_inputs(model, model.model.layers, ids)
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert torch.equal(h, reference[0])
        out0 = first(model.model.layers[0](h, *extras[0][0], **extras[0][1]))  # transformers 4.x: a tuple
        assert torch.equal(out0, reference[1])
        b1 = model.model.layers[1]
        assert torch.equal(model.model.norm(first(b1(out0, *extras[1][0], **extras[1][1]))), reference[2])
        assert not torch.equal(model.model.norm(first(b1(out0, *extras[0][0], **extras[0][1]))), reference[2])


def test_the_pipeline_carries_the_models_own_activations(tmp_path):
    """Through Gemma-3's sliding and full blocks, the fp stream that quantize_model carries (saved
    with resume_dir after the last block) is the unquantized model's own last hidden state on each
    calibration chunk, bit for bit: each block ran with its own mask and rotary embedding."""
    from safetensors.torch import load_file

    model, reference = tiny_arch_model("gemma3"), tiny_arch_model("gemma3")
    _quantize(model, fp_targets=True, resume_dir=tmp_path / "r")
    saved = load_file(tmp_path / "r" / "activations.safetensors")
    calibration = _ids(8, 1)
    with torch.no_grad():
        for c in range(2):  # batch_size 4
            states = reference(input_ids=calibration[4 * c:4 * c + 4], output_hidden_states=True).hidden_states
            assert torch.equal(reference.model.norm(saved[f"f.{c}"]), states[-1])


def test_blocks_of_another_structure_are_probed_again():
    """Each kind of block is probed on its first block: a block whose forward differs from the
    first one's (here block 1 of a tiny Llama made parallel, GPT-J style) takes the generic path,
    and the model quantizes exactly as with the generic path throughout."""
    def parallel(model):
        block = model.model.layers[1]

        def forward(hidden_states, attention_mask=None, position_embeddings=None, **kw):
            a, _ = block.self_attn(hidden_states=block.input_layernorm(hidden_states), attention_mask=attention_mask,
                                   position_embeddings=position_embeddings, **kw)
            return hidden_states + a + block.mlp(block.post_attention_layernorm(hidden_states))

        block.forward = forward
        return model

    mixed = parallel(tiny_model())
    log = _quantize(mixed)
    assert [e["path"] for e in log["layers"]] == ["staged"] * 7 + ["generic"] * 7
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LlamaFlow, "probe", classmethod(lambda cls, *a: False))
        generic = parallel(tiny_model())
        _quantize(generic)
    ids = _ids(2, 13)
    assert torch.equal(logits(mixed, ids), logits(generic, ids))


def test_widths_the_codes_cannot_take_are_named_before_any_work():
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(hidden, intermediate):
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))

    model = llama(64, 176)  # 176 = 11·16: groups of 16 fit, the Hadamard rotation does not
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"cannot quantize 2 linear\(s\): model\.layers\.0\.mlp\.down_proj "
                                         r"\(in_features 176 is not a Hadamard size .*20, 28"):
        _quantize(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, pvq_cuda.PVQLinear) for m in model.modules())
    unrotated = pvq_cuda.PVQConfig(D=16, K=30, scale_bits=2, rotate=False)
    _quantize(model, overrides={r"mlp\.down_proj": unrotated})  # without the rotation 176 fits
    assert model.model.layers[1].mlp.down_proj.config == unrotated
    with pytest.raises(ValueError, match=r"in_features 40 is not a multiple of the group size D=16"):
        _quantize(llama(40, 64))
    with pytest.raises(ValueError, match=r"gptq-rot-int4 cannot quantize .*Hadamard size"):
        pvq_cuda.quantize_model(llama(64, 176), _ids(4, 1), method="gptq-rot-int4", progress=False)


@pytest.mark.parametrize("arch,where", [
    ("Mixtral", r"model\.layers\.0\.(mlp|block_sparse_moe) is a MixtralSparseMoeBlock"),  # 4.x: block_sparse_moe
    ("Qwen2Moe", r"model\.layers\.0\.mlp is a Qwen2MoeSparseMoeBlock"),
    ("Qwen3Moe", r"model\.layers\.0\.mlp is a Qwen3MoeSparseMoeBlock"),
])
def test_mixture_of_experts_is_refused_by_name(arch, where):
    import transformers

    experts = ({"num_local_experts": 4} if arch == "Mixtral"
               else {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64})
    config = getattr(transformers, f"{arch}Config")(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   num_experts_per_tok=2, **experts)
    model = getattr(transformers, f"{arch}ForCausalLM")(config)
    with pytest.raises(ValueError, match=f"mixture-of-experts layers are not supported: {where}"):
        _quantize(model)
    assert not any(isinstance(m, pvq_cuda.PVQLinear) for m in model.modules())


def test_fused_expert_parameters_and_stray_matrices_are_refused_by_name():
    model = tiny_model()
    model.model.layers[1].mlp.register_parameter("stacked", nn.Parameter(torch.zeros(4, 128, 64)))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.stacked is a 3-D parameter \[4, 128, 64\] of a "
                                         r"LlamaMLP, not an nn\.Linear weight: fused mixture-of-experts weights"):
        _quantize(model)
    model = tiny_model()
    model.model.layers[0].self_attn.register_parameter("mix", nn.Parameter(torch.zeros(8, 64)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.mix is a 2-D parameter \[8, 64\] of a "
                                         r"LlamaAttention, not an nn\.Linear weight: .* would leave it unquantized"):
        _quantize(model)


def test_models_without_model_layers_get_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4))
    with pytest.raises(TypeError, match=r"blocks are model\.model\.layers.*GPT2LMHeadModel.*transformer\.h"):
        _quantize(model)
