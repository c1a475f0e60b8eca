"""Shared by the inference tests: a tiny chat checkpoint and a live `chipshift serve`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import torch

from chipshift.data.tokenizer import Tokenizer
from chipshift.model.checkpoint import save_checkpoint
from chipshift.model.config import preset
from chipshift.model.transformer import build_model
from chipshift.errors import ChipshiftError
from chipshift.infer.cli import wait_healthy

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(tokenizer_dir: Path, out: Path, dtype: torch.dtype = torch.float32,
                    chatty: bool = False) -> Path:
    """A tiny random model that matches the tokenizer; a wide init so its output varies.
    `chatty` makes the stop tokens (end of turn, end of text) all but impossible to sample,
    for tests that need a reply of more than a token or two at temperature 1."""
    tok = Tokenizer.load(tokenizer_dir)  # folds chat_template.jinja into the config
    tok_dir = out.parent / f"{out.name}-tokenizer"
    tok.save(tok_dir)
    cfg = preset("tiny", vocab_size=tok.vocab_size, init_std=0.15, max_seq_len=512,
                 tie_embeddings=not chatty)
    model = build_model(cfg, dtype=dtype, seed=0)
    if chatty:
        with torch.no_grad():
            head = model.lm_head.weight
            head.mul_(8.0)  # spread the logits so that a zero logit is far below the top ones
            head[sorted(tok.stop_ids())] = 0.0
    return save_checkpoint(model, out, tokenizer_dir=tok_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(ckpt: Path, *extra: str, timeout: float = 60.0):
    """Run `chipshift serve CKPT` in a subprocess on a free port; yield its base URL. It
    serves in the dtype the precision policy picks (as a user's `chipshift serve` does):
    bfloat16 natively, bfloat16 through the kernel twin, or float32 without a compiler.
    CI runs the suite under each outcome (`.ci/run`, CHIPSHIFT_HALF / CHIPSHIFT_CPU_KERNELS).
    The server is pinned to this process's decisions, so that a test comparing it with an
    engine in this process compares the same arithmetic even when a loaded machine would
    make the server's own probes decide otherwise."""
    port = free_port()
    cmd = [sys.executable, "-m", "chipshift", "serve", str(ckpt), "--port", str(port),
           "--device", "cpu", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), **probe_pins()}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(proc, url, timeout)
        except ChipshiftError as e:
            raise RuntimeError(f"{e}: {proc.stdout.read() if proc.poll() is not None else ''}") from e
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def probe_pins() -> dict[str, str]:
    """CHIPSHIFT_HALF / CHIPSHIFT_CPU_KERNELS pinned to what this process's probes decided
    (only those not pinned already)."""
    from chipshift.devices import get_device
    from chipshift.devices.policy import HALF_ENV, KERNELS_ENV

    policy = get_device("cpu").precision
    pins = {}
    native = policy.half_native().value
    if HALF_ENV not in os.environ:
        pins[HALF_ENV] = "native" if native else "emulated"
    if KERNELS_ENV not in os.environ and native and policy.cpu_kernel().value:
        pins[KERNELS_ENV] = "on" if policy.kernel_beats_torch().value else "off"
    return pins


def metric(url: str, name: str, headers: dict | None = None) -> float:
    """One unlabelled sample from /metrics."""
    text = httpx.get(url + "/metrics", headers=headers or {}).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def assert_greedy_agrees_up_to_near_ties(model, prompts, outputs, max_tokens: int, tolerance: float) -> None:
    """The engine's greedy `outputs` against the naive generator's on `model`: the first four
    tokens agree, and where they part, the reference's own logits held a near-tie (the gap
    between its token and the engine's at most `tolerance` x the largest logit): another
    rounding order, or 8-bit activations, may flip such a tie and nothing more."""
    from chipshift.model.generate import generate_naive

    for p, got in zip(prompts, outputs):
        want = generate_naive(model, p, max_tokens)
        assert got[:4] == want[:4]
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is not None:
            with torch.no_grad():
                logits = model(torch.tensor([p + want[:first]]))[0, -1].float()
            gap = (logits[want[first]] - logits[got[first]]).item()
            assert 0 <= gap <= tolerance * logits.abs().max().item(), (first, gap)
