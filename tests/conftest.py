"""Shared fixtures: small, built in-process, no network."""

import json
import os

import pytest

# The float32 GEMM probe (PrecisionPolicy.fp32_gemm) is timed, so two processes near its line
# could decide apart; tests compare runs across processes (torchrun, resume, parity), so the
# session decides once and every process it starts inherits the pin. CI runs the other outcome
# too (.ci/run).
if "CHIPSHIFT_FP32_GEMM" not in os.environ:
    from chipshift.devices import get_device

    os.environ["CHIPSHIFT_FP32_GEMM"] = get_device("cpu").precision.fp32_gemm().value

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens and
    the chat template stored apart (chat_template.jinja), as recent transformers save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["hello there, how are you?", "the capital of France is Paris.", "tokens and more tokens"] * 20
    tok.train_from_iterator(text, trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


# `any_class` marks a test whose outcome cannot depend on the CPU class because nothing in it
# asks the precision policy, the only place the class is decided and where .ci/run's pins act.
# CI's pinned passes skip such tests, and this guard holds the mark to its word (tested in
# test_ci_marks.py): inside the test, making or asking a policy raises; a process it starts
# fails on the pins' values if it reads one; and the fixtures it uses are its own or, of those
# shared across tests, ones that build no model (text, tokenizers, the wheel's environment).
POLICY_PINS = ("CHIPSHIFT_HALF", "CHIPSHIFT_FP32_GEMM", "CHIPSHIFT_CPU_KERNELS")
MODEL_FREE_FIXTURES = {"tmp_path_factory", "tiny_tokenizer_dir", "sample_corpora", "small_tok", "tok_dir", "venv"}


@pytest.fixture(autouse=True)
def _any_class_asks_no_policy(request, monkeypatch):
    if request.node.get_closest_marker("any_class") is None and not os.environ.get("CHIPSHIFT_GUARD_ALL"):
        yield
        return
    import subprocess

    from chipshift.devices.policy import PrecisionPolicy

    shared = {name for name, defs in request.node._fixtureinfo.name2fixturedefs.items()
              if defs[-1].scope != "function"} - MODEL_FREE_FIXTURES
    assert not shared, f"{request.node.nodeid} is marked any_class but uses shared fixtures {sorted(shared)}"

    def refuse(self, *args):  # making a policy, or asking one made earlier anything
        raise AssertionError(f"{request.node.nodeid} is marked any_class but asked the precision policy")

    poison = dict.fromkeys(POLICY_PINS, "marked-any-class")
    popen_init = subprocess.Popen.__init__

    def popen_poisoned(self, *args, env=None, **kwargs):  # an env built before the test began, too
        popen_init(self, *args, env=None if env is None else {**env, **poison}, **kwargs)

    monkeypatch.setattr(PrecisionPolicy, "__init__", refuse)
    monkeypatch.setattr(PrecisionPolicy, "__getattribute__", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen_poisoned)
    for var, value in poison.items():
        monkeypatch.setenv(var, value)
    yield
