"""`chipshift serve` (OpenAI-compatible HTTP server) and `chipshift chat` (terminal chat)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from chipshift.errors import ChipshiftError

EXIT_WITH_PARENT = "CHIPSHIFT_EXIT_WITH_PARENT"  # set by served(): the pid whose exit ends the server


def _engine_args(p) -> None:
    p.add_argument("checkpoint", help="a chipshift checkpoint directory")
    p.add_argument("--device", default=None, help="device type, optionally with an index (cpu, npu:1, ...); "
                                                  "default: $CHIPSHIFT_DEVICE or the first accelerator found")
    p.add_argument("--dtype", default="auto", help="serving dtype: auto (bfloat16 where it is fast, or on a "
                                                   "CPU that emulates it where chipshift's kernel builds; else "
                                                   "float32), bfloat16, float16 or float32")
    p.add_argument("--emulate", metavar="PROFILE_OR_CHIP",
                   help="serve with another chip's arithmetic: a numerics profile (fp16-only, bf16, tf32, fp8-ue8m0, "
                        "...) or a chip (ascend-910a, h100-sxm:fp8-e4m3, ...); see docs/rehearse.md")
    p.add_argument("--max-batch", type=int, default=8, help="batch slots: requests decoded together (default 8)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per slot (prompt + output); default: the model's context, at most 4096")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (fixed shapes)")
    p.add_argument("--force", action="store_true",
                   help="serve even though the checkpoint's last verified handoff failed")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                       description="Serve a checkpoint: /v1/models, /v1/completions and /v1/chat/completions "
                                   "(streaming as server-sent events), /health, /metrics (Prometheus) and a "
                                   "chat page at /. Requests are batched continuously.")
    _engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page")
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the directory name)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    p.set_defaults(func=serve)

    c = sub.add_parser("chat", help="chat with a checkpoint in the terminal",
                       description="An interactive chat that streams the reply as it is generated. "
                                   "Type /reset to start over, /quit (or Ctrl-D) to leave.")
    _engine_args(c)
    c.add_argument("--system", default=None, help="a system message to start the conversation with")
    c.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    c.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    c.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    c.add_argument("--seed", type=int, default=None, help="seed for reproducible replies")
    c.set_defaults(func=chat)


def _load(args):
    from chipshift.infer.engine import Engine
    from chipshift.model.checkpoint import check_handoff_allowed

    check_handoff_allowed(args.checkpoint, force=args.force)
    if args.max_batch <= 0:
        raise ChipshiftError(f"--max-batch {args.max_batch}: must be a positive integer")
    engine = Engine.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype, emulate=args.emulate,
                                    max_batch=args.max_batch, max_len=args.max_len, compile=args.compile)
    print(f"chipshift: {Path(args.checkpoint).name}: {engine.describe()}; dtype {engine.dtype_reason}",
          file=sys.stderr)
    return engine


def serve(args) -> int:
    import uvicorn

    from chipshift.infer.server import create_app

    if not 0 < args.port < 65536:
        raise ChipshiftError(f"--port {args.port}: must be in 1..65535")
    engine = _load(args)
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(engine, name, api_key=args.api_key)
    # HTTP on a second thread, the engine's scheduler on this (main) one: see Engine.run
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="chipshift-http", daemon=True)
    http.start()
    print(f"chipshift: serving '{name}' on http://{args.host}:{args.port}"
          f"{' (API key required)' if args.api_key else ''}", file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C
    # started by served(): leave with the process that started us, even when it was SIGKILLed
    parent = int(os.environ.pop(EXIT_WITH_PARENT, "0") or 0)
    try:
        engine.run(until=lambda: not http.is_alive() or (parent > 0 and os.getppid() != parent))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.abort("the server is shutting down")
        server.should_exit = True
        http.join(timeout=10)
    if not server.started:
        raise ChipshiftError(f"could not serve on {args.host}:{args.port} (see the message above)")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def chat(args) -> int:
    import queue

    from chipshift.infer.engine import Request
    from chipshift.infer.sampling import SamplingParams

    engine = _load(args)
    if engine.tokenizer is None or not engine.tokenizer.chat_template:
        raise ChipshiftError(f"{args.checkpoint} has no tokenizer with a chat template")
    engine.start()
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print("chat: /reset starts over, /quit or Ctrl-D leaves", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return 0
            if line.strip() == "/quit":
                return 0
            if line.strip() == "/reset":
                messages = list(start)
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages))
            room = engine.max_len - len(ids)
            if room <= 0:
                print("chat: the conversation no longer fits the context; /reset to start over", file=sys.stderr)
                messages.pop()
                continue
            events: queue.Queue = queue.Queue()
            params = SamplingParams(max_tokens=min(args.max_tokens, room), temperature=args.temperature,
                                    top_p=args.top_p, seed=args.seed)
            req = engine.submit(Request(ids, params, on_update=lambda r, d, f: events.put((d, f))))
            print("assistant> ", end="", flush=True)
            try:
                while True:
                    delta, finished = events.get()
                    print(delta, end="", flush=True)
                    if finished:
                        break
            except KeyboardInterrupt:  # stop this reply, keep the chat
                req.cancel()
                req.done.wait()
            print()
            messages.append({"role": "assistant", "content": req.text})
    finally:
        engine.stop()


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, what: str = "chipshift serve") -> None:
    """Return once URL/health answers 200; raise if the server process exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise ChipshiftError(f"{what} exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ChipshiftError(f"{what} did not answer /health within {timeout_s:g} s")
        time.sleep(0.2)


@contextlib.contextmanager
def served(ckpt: str | Path, device: str, dtype: str, *, max_batch: int = 8, model_name: str | None = None,
           force: bool = False, emulate: str | None = None, timeout_s: float = 300,
           log=print) -> Iterator[str]:
    """`chipshift serve CKPT` in a subprocess on 127.0.0.1 (a free port) for the `with` block;
    yields the base URL ("http://127.0.0.1:PORT/v1") once /health answers; stops the server after."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "chipshift", "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
           "--device", device, "--dtype", dtype, "--max-batch", str(max_batch),
           "--model-name", model_name or Path(ckpt).resolve().name, *(["--force"] if force else []),
           *(["--emulate", emulate] if emulate else [])]
    log("  $ " + " ".join(cmd))
    # a Ctrl-C here is ours to pass on; a SIGKILL of ours ends the server too (EXIT_WITH_PARENT)
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, EXIT_WITH_PARENT: str(os.getpid())})
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None  # SIGTERM: clean up as on Ctrl-C
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", timeout_s, what=f"chipshift serve {ckpt}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
