"""Bad input on the command line: one line on stderr, exit status 2, no traceback."""

import json
import subprocess
import sys

import pytest

from chipshift.model import build_model, preset
from chipshift.model.checkpoint import save_checkpoint

LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 64}


def chipshift(*args, env_extra=None):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "chipshift", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def hf_folder(tmp_path, config, weights: bytes):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture
def corrupt_ckpt(tmp_path):
    path = save_checkpoint(build_model(preset("tiny")), tmp_path / "ckpt")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    return path


CASES = {
    "missing path": (lambda tmp: ["import", tmp / "nope.gguf", tmp / "out"], "not found"),
    "unsupported architecture": (lambda tmp: ["import", hf_folder(tmp, {**LLAMA_CONFIG, "architectures":
                                                                      ["GPT2LMHeadModel"]}, b""), tmp / "out"],
                                 "supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM"),
    "corrupted safetensors": (lambda tmp: ["import", hf_folder(tmp, LLAMA_CONFIG, b"\x10\0\0\0\0\0\0\0{garbage"),
                                           tmp / "out"], "model.safetensors is not a readable safetensors"),
    "unknown device": (lambda tmp: ["generate", tmp, "hi", "--device", "tpu"],
                       "known devices: cpu, cuda, npu, mlu, xpu, musa, mps"),
    "missing plugin": (lambda tmp: ["generate", tmp, "hi", "--device", "npu"], "install torch-npu"),
    "not a checkpoint": (lambda tmp: ["generate", tmp, "hi", "--device", "cpu"], "not a chipshift checkpoint"),
    "neither gguf nor hf": (lambda tmp: ["import", tmp, tmp / "out"], "neither a .gguf file nor"),
}


# all but "not a checkpoint" fail before the precision policy is asked (generate asks it first)
@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c == "not a checkpoint" else pytest.mark.any_class)
                                  for c in CASES])
def test_one_line_error_exit_2(case, tmp_path):
    make_args, message = CASES[case]
    r = chipshift(*make_args(tmp_path))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert message in lines[0] and lines[0].startswith("chipshift ")


def test_corrupt_checkpoint_is_refused_by_generate(corrupt_ckpt):
    r = chipshift("generate", corrupt_ckpt, "hi", "--device", "cpu", "--dtype", "float32")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "model.safetensors is corrupt" in r.stderr
