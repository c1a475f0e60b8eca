"""`chipshift env diff A B`: the keys that differ between two dumps', checkpoints' or runs'
environments, and one line for a path that is none of them."""

from __future__ import annotations

import json

import pytest

from chipshift.cli import main

pytestmark = pytest.mark.any_class  # nothing here asks the precision policy (conftest checks)


def _dump(path, torch_version: str, threads: int, dtype: str, compile: bool):
    path.mkdir()
    env = {"device": "cpu", "device_type": "cpu", "plugin": None, "torch": torch_version, "threads": threads,
           "versions": {"torch": torch_version, "python": "3.11.2"}, "host": "h", "created": "2026-12-02T10:00:00Z"}
    (path / "dump.json").write_text(json.dumps({"env": env, "dtype": dtype, "run": {"compile": compile, "steps": 1,
                                                                                    "seconds": 1.5}}))
    return path


def test_env_diff_names_what_differs_and_nothing_else(tmp_path, capsys):
    a = _dump(tmp_path / "a", "2.13.0+cpu", 2, "float32", False)
    b = _dump(tmp_path / "b", "2.13.0+cpu", 8, "bfloat16", True)
    assert main(["env", "diff", str(a), str(b / "dump.json")]) == 0
    out = capsys.readouterr().out
    differ = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert differ == ["dtype", "env.threads", "run.compile"], out  # not `created`, not `run.seconds`
    assert "3 keys differ" in out and '2  ->  8' in out
    assert main(["env", "diff", str(a), str(a), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["differ"] == []


def test_env_diff_reads_runs_and_checkpoints(tmp_path, capsys):
    for name, dtype, torch_version in (("r1", "float32", "2.13.0"), ("r2", "bfloat16", "2.12.0")):
        step = tmp_path / name / "checkpoints" / "step_00000010"
        step.mkdir(parents=True)
        (tmp_path / name / "config.resolved.json").write_text(json.dumps(
            {"run": {"dtype": "auto", "compile": "auto"}, "resolved": {"compute_dtype": dtype, "compiled": False}}))
        (step / "chipshift.json").write_text(json.dumps(
            {"device": "cpu", "dtype": dtype, "versions": {"torch": torch_version}, "created": name}))
    assert main(["env", "diff", str(tmp_path / "r1"), str(tmp_path / "r2")]) == 0
    out = capsys.readouterr().out
    assert "(training run)" in out
    for key in ("resolved.compute_dtype", "checkpoint.dtype", "checkpoint.versions.torch"):
        assert key in out, out
    ckpt = tmp_path / "r1" / "checkpoints" / "step_00000010"
    assert main(["env", "diff", str(ckpt), str(tmp_path / "r2" / "checkpoints" / "step_00000010")]) == 0
    assert "(checkpoint)" in capsys.readouterr().out


def test_env_diff_refuses_what_it_cannot_read_in_one_line(tmp_path, capsys):
    assert main(["env", "diff", str(tmp_path), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a parity dump" in err[0] and "config.resolved.json" in err[0]
