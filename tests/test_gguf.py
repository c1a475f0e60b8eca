"""GGUF adapter: name map, RoPE un-permutation, dequantisation, and agreement with
transformers' own GGUF loader (on a small synthetic file, and on the real SmolLM2 file)."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.any_class  # nothing here asks the precision policy (conftest checks)

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from chipshift.errors import CheckpointError
from chipshift.model.checkpoint import load_checkpoint
from chipshift.model.gguf import import_gguf, our_name, unpermute_rope_rows

Q = gguf.GGMLQuantizationType


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of dim 8
    back = unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(w, 2)), 2)
    assert torch.equal(back, torch.from_numpy(w))
    # pinned layout: head 0 of the permuted rows interleaves rotate-half pairs (0,4), (1,5), ...
    assert llama_cpp_permute(np.arange(16), 2)[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_name_map():
    assert our_name("token_embd.weight") == "embed_tokens.weight"
    assert our_name("blk.7.attn_output.weight") == "layers.7.self_attn.o_proj.weight"
    assert our_name("blk.0.ffn_norm.weight") == "layers.0.post_attention_layernorm.weight"
    with pytest.raises(CheckpointError, match="blk.0.ssm_conv"):
        our_name("blk.0.ssm_conv.weight")


HF_TO_GGUF = {
    "model.embed_tokens.weight": ("token_embd.weight", Q.Q8_0),
    "model.norm.weight": ("output_norm.weight", Q.F32),
    "lm_head.weight": ("output.weight", Q.Q4_0),
}
LAYER = {"input_layernorm.weight": ("attn_norm.weight", Q.F32),
         "post_attention_layernorm.weight": ("ffn_norm.weight", Q.F32),
         "self_attn.q_proj.weight": ("attn_q.weight", Q.Q4_1),
         "self_attn.k_proj.weight": ("attn_k.weight", Q.Q8_0),
         "self_attn.v_proj.weight": ("attn_v.weight", Q.F16),
         "self_attn.o_proj.weight": ("attn_output.weight", Q.BF16),
         "mlp.gate_proj.weight": ("ffn_gate.weight", Q.Q4_1),
         "mlp.up_proj.weight": ("ffn_up.weight", Q.Q4_0),
         "mlp.down_proj.weight": ("ffn_down.weight", Q.F32)}


def _add_tokenizer(w, tokenizer_dir):
    """GPT-2 style tokenizer metadata, as llama.cpp's converter stores a byte-level BPE."""
    import json

    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    specials = {t["content"]: t["id"] for t in tj["added_tokens"]}
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])  # 3 = control, 1 = normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(specials["<|im_start|>"])
    w.add_eos_token_id(specials["<|im_end|>"])
    w.add_chat_template((tokenizer_dir / "chat_template.jinja").read_text())


def _write_llama_gguf(path, hf_model, tokenizer_dir=None):
    """A llama GGUF written the way llama.cpp's converter writes one."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    if tokenizer_dir is not None:
        _add_tokenizer(w, tokenizer_dir)
    w.add_name("tiny-test")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    names = dict(HF_TO_GGUF)
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}": (f"blk.{i}.{g}", q) for k, (g, q) in LAYER.items()})
    for hf_name, t in hf_model.state_dict().items():
        g_name, qtype = names[hf_name]
        data = t.float().numpy()
        if g_name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, c.num_attention_heads)
        if g_name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, c.num_key_value_heads)
        if qtype == Q.F32:
            w.add_tensor(g_name, data)
        else:
            w.add_tensor(g_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_synthetic_quantised_gguf_agrees_with_transformers_loader(tmp_path, tiny_tokenizer_dir):
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                   tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    _write_llama_gguf(tmp_path / "tiny.gguf", hf, tiny_tokenizer_dir)

    ckpt = import_gguf(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    ours, _ = load_checkpoint(ckpt)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                           dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
        exact = hf(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    assert not torch.equal(a, exact)  # the file really was quantised
    # q (Q4_1) and k (Q8_0) come back in Hugging Face row order, up to quantisation error
    for name in ("q_proj", "k_proj"):
        want = getattr(hf.model.layers[1].self_attn, name).weight
        got = getattr(ours.layers[1].self_attn, name).weight
        assert ((got - want).norm() / want.norm()).item() < 0.2, name


def test_tokenizer_and_chat_template_come_from_gguf_metadata(tmp_path, tiny_tokenizer_dir):
    from chipshift.data.tokenizer import Tokenizer

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64)
    _write_llama_gguf(tmp_path / "tok.gguf", transformers.LlamaForCausalLM(cfg), tiny_tokenizer_dir)
    tok = Tokenizer.load(import_gguf(tmp_path / "tok.gguf", tmp_path / "ckpt"))
    ref = Tokenizer.load(tiny_tokenizer_dir)
    text = "hello there, the capital of France is Paris."
    assert tok.encode(text) == ref.encode(text) and tok.decode(tok.encode(text)) == text
    messages = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages)
    assert (tok.bos_id, tok.eos_id) == (ref.bos_id, ref.eos_id)


def test_not_a_gguf_file_is_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(CheckpointError, match="bad.gguf"):
        import_gguf(bad, tmp_path / "ckpt")


@pytest.mark.slow
def test_smollm2_gguf_agrees_with_transformers_loader(tmp_path):
    """Acceptance: logits max abs difference <= 1e-3 on a fixed prompt (about 80 s here)."""
    from chipshift.data.packages import smollm2_gguf
    from chipshift.data.tokenizer import Tokenizer

    path = smollm2_gguf()
    ckpt = import_gguf(path, tmp_path / "smollm2")
    ours, _ = load_checkpoint(ckpt)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompt = "The capital of France is Paris, and the capital of Germany is"
    ids = Tokenizer.load(ckpt).encode(prompt)
    assert ids == ref_tok(prompt).input_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours(x) - ref(x).logits).abs().max().item()
    print(f"SmolLM2 GGUF vs transformers: logits max abs diff {diff:.3g}")
    assert diff <= 1e-3

    from chipshift.demo import answer

    assert "Paris" in answer(ours.eval(), Tokenizer.load(ckpt), "What is the capital of France?", max_new_tokens=12)
