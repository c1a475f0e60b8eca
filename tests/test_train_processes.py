"""Whole `chipshift pretrain` runs in subprocesses: SIGKILL + --resume is bit-exact, and
two torchrun processes, replicated (ddp) or sharded (fsdp), follow the one-process loss curve
and resume with one process."""

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chipshift.data.shards import prepare
from chipshift.train.state import list_checkpoints, load

pytestmark = pytest.mark.slow  # whole runs in subprocesses: about a minute each on 2 idle cores

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
WORDS = "the king said unto his lords that all the realm shall keep the peace of the land and".split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(600)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    prepare(tiny_tokenizer_dir, root / "shards", sources=[], files=[root / "corpus.txt"], val_fraction=0.1)
    return root / "shards"


def write_config(path, data_dir, out, micro_batch=2, **extra):
    sections = {
        "run": {"out": str(out), "device": "cpu", "dtype": "float32", "seed": 1},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 128, "max_seq_len": 64},
        "data": {"dir": str(data_dir), "seq_len": 32, "batch_size": 4, **({"micro_batch": micro_batch} if micro_batch else {})},
        "optim": {"warmup_steps": 2, "lr": 3e-3},
        "train": {"steps": 14, "log_every": 1, "eval_every": 0, "ckpt_every": 2, "keep_last": 2,
                  "eval_batches": 2},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        sections[section][name] = value
    text = ""
    for name, values in sections.items():
        text += f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    path.write_text(text)
    return path


def pretrain(*args, launcher=(sys.executable, "-m", "chipshift")):
    return subprocess.run([*launcher, "pretrain", *map(str, args), "--no-progress"], env=ENV,
                          capture_output=True, text=True, timeout=300)


def torchrun(n):
    return (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            "-m", "chipshift")


def final_state(run_dir):
    return load(list_checkpoints(run_dir)[-1])


def per_step(run_dir, key="loss"):
    return {r["step"]: r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if key in r}


def children(pid):
    """The pids of a process's children (Linux /proc)."""
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except OSError:  # gone already
        return []


def kill_job(proc):
    """SIGKILL a launcher and every process under it. torchrun starts each worker in a session
    of its own, which a kill of the launcher's process group does not reach; the launcher is
    stopped first, so that it starts no worker while they are looked up."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGSTOP)
        stack, found = [proc.pid], []
        while stack:
            found.append(stack.pop())
            stack += children(found[-1])
        for pid in reversed(found):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
    proc.wait()


def kill_after_checkpoint(cmd, run_dir, min_step):
    """Start `cmd`, SIGKILL its whole process group once a checkpoint >= min_step exists."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir)]
        if done and max(done) >= min_step:
            time.sleep(random.uniform(0, 0.3))  # land somewhere inside a later step
            kill_job(proc)
            return
        time.sleep(0.02)
    raise AssertionError(f"run ended or stalled before step {min_step}: {proc.stderr.read()[-2000:]}")


def test_sigkill_then_resume_is_bit_identical(tmp_path, data_dir):
    ref = pretrain(write_config(tmp_path / "a.toml", data_dir, tmp_path / "a"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    cfg = write_config(tmp_path / "b.toml", data_dir, tmp_path / "b")
    kill_at = random.Random().randint(2, 10)
    kill_after_checkpoint([sys.executable, "-m", "chipshift", "pretrain", str(cfg), "--no-progress"],
                          tmp_path / "b", kill_at)
    resumed = pretrain(cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    (wa, sa), (wb, sb) = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert wa.keys() == wb.keys() and sa.keys() == sb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"weights differ after a kill at step >= {kill_at}"
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert per_step(tmp_path / "a") == per_step(tmp_path / "b")


def test_two_processes_match_one_and_resume_with_one(tmp_path, data_dir):
    one = pretrain(write_config(tmp_path / "one.toml", data_dir, tmp_path / "one", micro_batch=None))
    assert one.returncode == 0, one.stderr[-2000:]
    two = pretrain(write_config(tmp_path / "two.toml", data_dir, tmp_path / "two"), launcher=torchrun(2))
    assert two.returncode == 0, two.stderr[-3000:]
    ref, got = per_step(tmp_path / "one"), per_step(tmp_path / "two")
    assert ref.keys() == got.keys() and len(ref) == 14
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
    assert worst <= 1e-5, f"2 processes vs 1: relative loss difference {worst:.2e}"

    # killed with 2 processes, resumed with 1: ends where the 1-process run ends
    cfg = write_config(tmp_path / "mix.toml", data_dir, tmp_path / "mix")
    kill_after_checkpoint([*torchrun(2), "pretrain", str(cfg), "--no-progress"], tmp_path / "mix", 6)
    resumed = pretrain(cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (wa, _), (wb, _) = final_state(tmp_path / "one"), final_state(tmp_path / "mix")
    for k in wa:
        np.testing.assert_allclose(wb[k].numpy(), wa[k].numpy(), rtol=1e-4, atol=1e-5)


def test_fsdp_two_processes_match_one_and_resume_with_one(tmp_path, data_dir):
    """run.parallel = "fsdp": 2 processes x 2 accumulated micro-batches (the first without
    gradient sync) follow the 1-process curve, and their checkpoint resumes with 1 process."""
    short = {"train__steps": 8, "train__ckpt_every": 4, "train__eval_every": 4, "train__keep_last": 3}
    one = pretrain(write_config(tmp_path / "one.toml", data_dir, tmp_path / "one", micro_batch=None, **short))
    assert one.returncode == 0, one.stderr[-2000:]
    cfg = write_config(tmp_path / "fsdp.toml", data_dir, tmp_path / "fsdp", micro_batch=1, run__parallel="fsdp",
                       **short)
    two = pretrain(cfg, launcher=torchrun(2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "parallel: fsdp (FSDP2)" in two.stdout
    assert json.loads((tmp_path / "fsdp" / "config.resolved.json").read_text())["resolved"]["sharded"] is True
    ref, got = per_step(tmp_path / "one"), per_step(tmp_path / "fsdp")
    assert ref.keys() == got.keys() and len(ref) == 8
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
    assert worst <= 1e-5, f"2 FSDP processes vs 1: relative loss difference {worst:.2e}"
    # clipping (at optim.grad_clip = 1) acts on every step, by the norm over both processes' shards
    ref_norm, got_norm = per_step(tmp_path / "one", "grad_norm"), per_step(tmp_path / "fsdp", "grad_norm")
    assert min(ref_norm.values()) > 1 and all(abs(got_norm[s] / ref_norm[s] - 1) <= 1e-5 for s in ref)

    # the 2-process checkpoint of step 4, resumed by 1 process, ends where the 1-process run ends
    latest = list_checkpoints(tmp_path / "fsdp")[-1]
    assert latest.name == "step_00000008"
    shutil.rmtree(latest)
    resumed = pretrain(cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step_00000004" in resumed.stdout and "nothing to shard" in resumed.stdout
    got = per_step(tmp_path / "fsdp")
    assert max(abs(got[s] - ref[s]) / abs(ref[s]) for s in range(5, 9)) <= 1e-5
    (wa, sa), (wb, sb) = final_state(tmp_path / "one"), final_state(tmp_path / "fsdp")
    assert wa.keys() == wb.keys() and sa.keys() == sb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k].numpy(), wa[k].numpy(), rtol=1e-4, atol=1e-5)
