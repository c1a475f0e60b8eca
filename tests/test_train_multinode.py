"""Beyond one machine, with torchrun's own engine: separate torchrun agents as "nodes" meeting
through c10d rendezvous on 127.0.0.1, a worker SIGKILLed mid-run and brought back by
`--max-restarts`, a SIGSTOPped worker ended by `run.collective_timeout_s`, and a run that
goes from 2 nodes to 1 and back. Every agent runs in its own session and is killed whole in
`finally`; every wait is bounded."""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chipshift.devices import get_device
from chipshift.errors import ChipshiftError, ConfigError
from chipshift.model.checkpoint import read_sidecar, verify_checkpoint
from chipshift.model.config import preset
from chipshift.train import distributed, state
from chipshift.train.loop import checkpoint_to_resume
from chipshift.train.state import list_checkpoints
from test_train_processes import (ENV, children, data_dir, final_state, kill_job, per_step,  # noqa: F401
                                  pretrain, write_config)

NODE_ENV = {**ENV, "GLOO_SOCKET_IFNAME": "lo"}  # the collective's sockets stay on the loopback interface
# what jobs that torchrun may restart need (pytorch issue #135712; docs/train.md); the store
# then lives in the rank-0 worker, not in torchrun's agent
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
TOLERANCE = 1e-5  # relative per-step loss, as in the single-node torchrun tests
# write_config's run (batch 4 x 32 tokens), longer: a kill or a stop must land before its end
# also where a step takes 20 ms (a checkpoint's fsyncs take 10-30 times that)
STEPS, EVERY = 40, 4
RUN = {"train__steps": STEPS, "train__ckpt_every": EVERY, "train__keep_last": STEPS // EVERY}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workers(agent_pid: int) -> dict[int, int]:
    """{global rank: pid} of the workers an agent started (its children that carry RANK)."""
    out = {}
    for pid in children(agent_pid):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = pid
    return out


class Nodes:
    """One torchrun agent per entry of `node_args` (the `chipshift pretrain` arguments of
    that node), meeting at a fresh port on 127.0.0.1; `nproc` workers per agent."""

    def __init__(self, log_dir: Path, node_args: list[list], *, nproc: int = 1, max_restarts: int = 0,
                 env: dict | None = None) -> None:
        port, n = free_port(), len(node_args)
        self.logs = [log_dir / f"agent{i}-{port}.log" for i in range(n)]
        self.procs = []
        for log, args in zip(self.logs, node_args):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={n}", f"--nproc-per-node={nproc}",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--local-addr=127.0.0.1",
                   f"--max-restarts={max_restarts}", "-m", "chipshift", "pretrain", *map(str, args), "--no-progress"]
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(cmd, env={**NODE_ENV, **(env or {})}, stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            kill_job(p)  # the agent and its workers, stopped ones too

    def output(self) -> str:
        return "".join(log.read_text() for log in self.logs)

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        if any(p.poll() is None for p in self.procs):
            raise AssertionError(f"agents still running after {timeout} s:\n{self.output()[-3000:]}")
        return [p.returncode for p in self.procs]

    def wait_for_checkpoint(self, run_dir: Path, min_step: int, timeout: float = 240) -> None:
        wait_for_checkpoint(run_dir, min_step, self.procs, self.output, timeout)

    def all_workers(self) -> dict[int, int]:
        return {rank: pid for p in self.procs for rank, pid in workers(p.pid).items()}


def wait_for_checkpoint(run_dir: Path, min_step: int, procs, output, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(c.name.split("_")[1]) >= min_step for c in list_checkpoints(run_dir)):
            return
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of step >= {min_step} in {run_dir}:\n{output()[-3000:]}")


def loss_records(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_follows(run_dir: Path, reference: Path, steps=range(1, STEPS + 1)) -> None:
    ref, got = per_step(reference), per_step(run_dir)
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in steps)
    print(f"{run_dir.name}: steps {steps.start}-{steps.stop - 1}, largest relative loss difference {worst:.2e}")
    assert worst <= TOLERANCE, f"relative loss difference {worst:.2e} from the one-process run"


def assert_same_weights_within_tolerance(run_dir: Path, reference: Path) -> None:
    (wa, _), (wb, _) = final_state(reference), final_state(run_dir)
    assert wa.keys() == wb.keys()
    worst = max(float((wb[k] - wa[k]).abs().max()) for k in wa)
    print(f"{run_dir.name}: final weights, largest absolute difference {worst:.2e}")
    for k in wa:
        np.testing.assert_allclose(wb[k].numpy(), wa[k].numpy(), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):  # noqa: F811
    """One process, never interrupted: the curve every layout below must follow."""
    root = tmp_path_factory.mktemp("reference")
    done = pretrain(write_config(root / "one.toml", data_dir, root / "one", micro_batch=None, **RUN))
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "one"


# -- in-process: the rules, without processes (fast) --------------------------------------

def test_which_checkpoint_a_run_resumes_from(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS", raising=False)
    fresh, restarted = distributed.World(), distributed.World(restarted=True)
    assert checkpoint_to_resume(tmp_path, False, fresh) is None
    assert checkpoint_to_resume(tmp_path, "auto", fresh) is None  # nothing yet: start afresh
    assert checkpoint_to_resume(tmp_path, False, restarted) is None  # failed before its first checkpoint
    with pytest.raises(ChipshiftError, match="--resume: no valid checkpoint"):
        checkpoint_to_resume(tmp_path, True, fresh)
    path = state.save(tmp_path, 6, {"w": torch.zeros(2)}, preset("tiny"), {"rng.cpu": torch.get_rng_state()}, {})
    for resume, world in ((True, fresh), ("auto", fresh), (False, restarted)):
        assert checkpoint_to_resume(tmp_path, resume, world)[0] == path
    assert checkpoint_to_resume(tmp_path, False, fresh) is None  # a plain fresh run, as before
    # a fresh run torchrun may restart would continue, on restart, from another run's checkpoints
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    with pytest.raises(ConfigError, match="holds checkpoints already .*step_00000006.*--resume"):
        checkpoint_to_resume(tmp_path, False, fresh)


def test_restarts_with_a_shared_rendezvous_store_are_refused(monkeypatch):
    """torchrun --max-restarts, store shared with the workers: refused before joining the group."""
    launched = {"WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    for key, value in launched.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ChipshiftError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        distributed.init(get_device("cpu"))
    assert not torch.distributed.is_initialized()


@pytest.mark.any_class
def test_silent_rank_is_named_in_one_line(monkeypatch):
    """Rank 0 of 3 sees a collective fail; rank 2's heartbeat moves, rank 1's does not."""
    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    alive = distributed.Heartbeat(distributed._store(), 2)
    try:
        world = distributed.World(0, 3)
        server.add(distributed._beat_key(1), 1)  # rank 1 beat once, then went silent
        message = distributed.collective_failure(world, RuntimeError("Timed out waiting 5000ms\nmore"), 5.0,
                                                 "at step 3")
    finally:
        alive.stop()
    assert message.startswith("rank 1 of 3 stopped responding") and "\n" not in message
    assert "rank 0 gave up at step 3 (run.collective_timeout_s = 5): Timed out waiting 5000ms" in message


# -- whole jobs: torchrun agents on 127.0.0.1 (slow) --------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("parallel, micro_batch", [("ddp", 2), ("fsdp", 1)])
def test_two_nodes_match_one_process_write_once_and_resume_with_one(tmp_path, data_dir, reference,  # noqa: F811
                                                                     parallel, micro_batch):
    """Two agents (`--nnodes 2 --nproc-per-node 1`, c10d rendezvous): the one-process curve;
    each agent is given its own run.out, so the one global rank 1 must leave empty shows that
    every checkpoint is written once, by global rank 0 (not by each node's local rank 0)."""
    cfg = write_config(tmp_path / "two.toml", data_dir, tmp_path / "unused", micro_batch=micro_batch,
                       run__parallel=parallel, **RUN)
    outs = [tmp_path / "node_a", tmp_path / "node_b"]
    with Nodes(tmp_path, [[cfg, "--out", out] for out in outs]) as nodes:
        assert nodes.wait() == [0, 0], nodes.output()[-3000:]
    written = [out for out in outs if list_checkpoints(out)]
    assert len(written) == 1, f"checkpoints in {written}"
    silent = next(out for out in outs if out not in written)
    assert not (silent / "checkpoints").exists() and not (silent / "metrics.jsonl").exists()
    run = written[0]
    checkpoints = list_checkpoints(run)
    assert [c.name for c in checkpoints] == [f"step_{s:08d}" for s in range(EVERY, STEPS + 1, EVERY)]
    for c in checkpoints:
        verify_checkpoint(c)
        assert read_sidecar(c)["meta"]["world_size"] == 2
    assert loss_records(run) == list(range(1, STEPS + 1))  # each step logged once
    assert_follows(run, reference)
    if parallel == "fsdp":
        assert "parallel: fsdp (FSDP2), parameters, gradients and AdamW moments sharded over 2" in nodes.output()

    # resumable at any world size: one process continues from the 2-node checkpoint of step 20
    for c in checkpoints[5:]:
        shutil.rmtree(c)
    resumed = pretrain(cfg, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step_00000020" in resumed.stdout
    assert_follows(run, reference, range(21, STEPS + 1))
    assert_same_weights_within_tolerance(run, reference)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_ends_bit_identical(tmp_path, data_dir):  # noqa: F811
    """`--max-restarts 1`: SIGKILL of one node's worker at a random step; torchrun restarts the
    group, the restarted workers resume from the newest checkpoint by themselves, and the job
    ends with the weights, optimizer state and per-step losses of an uninterrupted run."""
    def job(name: str, restarts: int) -> tuple[Path, Nodes]:
        cfg = write_config(tmp_path / f"{name}.toml", data_dir, tmp_path / name, **RUN)
        return tmp_path / name, Nodes(tmp_path, [[cfg], [cfg]], max_restarts=restarts, env=RESTARTABLE)

    ref, nodes = job("uninterrupted", 0)
    with nodes:
        assert nodes.wait() == [0, 0], nodes.output()[-3000:]
    run, nodes = job("killed", 1)
    kill_at, victim = random.Random().randint(EVERY, STEPS // 2), random.Random().choice([0, 1])
    with nodes:
        nodes.wait_for_checkpoint(run, kill_at)
        time.sleep(random.uniform(0, 0.3))  # land somewhere inside a later step
        os.kill(nodes.all_workers()[victim], signal.SIGKILL)
        assert nodes.wait() == [0, 0], nodes.output()[-3000:]
        out = nodes.output()
    resumed = re.search(r"resumed from \S+step_(\d+) .* after an elastic restart", out)
    print(f"killed rank {victim} after the checkpoint of step >= {kill_at}; "
          f"resumed from step {int(resumed[1]) if resumed else None}")
    assert resumed and int(resumed[1]) < STEPS, out[-3000:]  # the kill landed inside the run
    (wa, sa), (wb, sb) = final_state(ref), final_state(run)
    assert wa.keys() == wb.keys() and sa.keys() == sb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == [], f"weights differ after a kill at step >= {kill_at}"
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert per_step(ref) == per_step(run) and loss_records(run) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_stopped_worker_ends_the_job_naming_its_rank(tmp_path, data_dir):  # noqa: F811
    """A SIGSTOPped worker: the other one's collective times out after run.collective_timeout_s
    and the job ends with one line naming the stopped rank; every checkpoint left verifies.
    (One agent with 2 workers: with one worker per agent, the stopped node's agent would wait
    for its worker until a restart or the scheduler ends it; docs/train.md.)"""
    timeout_s = 4
    cfg = write_config(tmp_path / "hang.toml", data_dir, tmp_path / "hang", run__collective_timeout_s=timeout_s,
                       train__steps=200, optim__warmup_steps=2)
    stop_at, victim = random.Random().randint(2, 8), random.Random().choice([0, 1])
    with Nodes(tmp_path, [[cfg]], nproc=2, env=RESTARTABLE) as nodes:  # the store in rank 0: stopped with it
        nodes.wait_for_checkpoint(tmp_path / "hang", stop_at)
        os.kill(nodes.all_workers()[victim], signal.SIGSTOP)
        stopped = time.monotonic()
        named = None
        while nodes.procs[0].poll() is None and time.monotonic() < stopped + 120:
            if named is None and "stopped responding" in nodes.output():
                named = time.monotonic() - stopped
            time.sleep(0.1)
        ended = time.monotonic() - stopped
        assert nodes.procs[0].poll() is not None, f"the job still runs {ended:.0f} s after the stop"
        out = nodes.output()
    print(f"stopped rank {victim} after the checkpoint of step >= {stop_at}: named after {named} s, "
          f"job ended after {ended:.1f} s")
    lines = [line for line in out.splitlines() if "stopped responding" in line]
    assert len(lines) == 1, out[-3000:]
    assert lines[0].startswith(f"chipshift pretrain: error: rank {victim} of 2 stopped responding")
    assert f"run.collective_timeout_s = {timeout_s}" in lines[0]
    # detected within the timeout, plus the step it was in and the heartbeat watch (3 s, or the 5 s
    # wait for a store that stopped with rank 0); the job
    # then ends when torchrun has stopped the workers (SIGTERM, then SIGKILL after its 30 s)
    assert named is not None and named <= timeout_s + 5 + 10, named
    assert nodes.procs[0].returncode != 0 and ended <= named + 30 + 15, ended
    checkpoints = list_checkpoints(tmp_path / "hang")
    assert checkpoints and all(verify_checkpoint(c) for c in checkpoints)
    assert state.latest_valid(tmp_path / "hang")[0] == checkpoints[-1]


@pytest.mark.slow
def test_two_nodes_to_one_and_back_continue_the_curve(tmp_path, data_dir, reference):  # noqa: F811
    """2 nodes until a checkpoint of step >= 8, then 1 process for 8 more steps, then 2 nodes
    to the end: the same global batch (4 sequences: 2 nodes x micro-batch 2, or 1 process x 2
    accumulated micro-batches of 2), the same data cursor and learning rate per step, and the
    one-process curve within the tolerance."""
    run = tmp_path / "resized"
    cfg = write_config(tmp_path / "resize.toml", data_dir, run, **RUN)
    with Nodes(tmp_path, [[cfg], [cfg]]) as nodes:
        nodes.wait_for_checkpoint(run, 8)
    handover = int(list_checkpoints(run)[-1].name.split("_")[1])
    assert handover + 8 < STEPS
    one = subprocess.Popen([sys.executable, "-m", "chipshift", "pretrain", str(cfg), "--resume", "--no-progress"],
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        wait_for_checkpoint(run, handover + 8, [one], lambda: "")
    finally:
        kill_job(one)
        log = one.stdout.read()
    assert "batch 4 x 32 = 1 process(es) x 2 x 2 accumulation" in log, log[-2000:]
    with Nodes(tmp_path, [[cfg, "--resume"], [cfg, "--resume"]]) as nodes:
        assert nodes.wait() == [0, 0], nodes.output()[-3000:]
    assert "batch 4 x 32 = 2 process(es) x 2 x 1 accumulation" in nodes.output()

    sizes = {}
    for c in list_checkpoints(run):
        meta = read_sidecar(c)["meta"]
        assert meta["data_cursor"] == 4 * meta["step"] and meta["global_batch"] == 4
        sizes[meta["step"]] = meta["world_size"]
    assert sizes[STEPS] == 2 and 1 in sizes.values(), sizes
    assert per_step(run, "lr") == per_step(reference, "lr")
    assert loss_records(run) == list(range(1, STEPS + 1))
    assert_follows(run, reference)
    assert_same_weights_within_tolerance(run, reference)
