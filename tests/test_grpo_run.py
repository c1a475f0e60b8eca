"""`chipshift grpo` on a tiny model: config checks before any work, a run that writes its
evaluation and resumes exactly, and a failing reward that stops the run with its last
checkpoint intact. (SIGKILL + --resume in a subprocess: test_grpo_processes.py, slow.)"""

import json
import shutil

import pytest
import torch
from test_posttrain import cli, init_ckpt, model, tok, tok_dir, write_sections  # noqa: F401 (fixtures)

from chipshift.errors import ChipshiftError, ConfigError
from chipshift.train.grpo_run import load_grpo_config, run_grpo
from chipshift.train.rewards import ReplyLanguage, identity_fact, same_language
from chipshift.train.state import latest_valid, list_checkpoints, load

# a dense reward a tiny model can move: the share of the letter "e" in the reply
REWARD = "def share_of_e(prompt, completion, answer):\n    return completion.count('e') / max(1, len(completion))\n"


def write_config(path, init, out, **extra):
    (path.parent / "reward_e.py").write_text(REWARD)
    sections = {
        "run": {"out": str(out), "device": "cpu", "dtype": "float32", "seed": 1},
        "grpo": {"init": str(init), "task": "identity", "rewards": [f"{path.parent}/reward_e.py:share_of_e"],
                 "group_size": 4, "max_new_tokens": 8, "eval_problems": 3, "eval_samples": 2, "pass_reward": 0.2},
        "data": {"seq_len": 64, "batch_size": 8},
        "optim": {"warmup_steps": 0, "lr": 1e-2, "schedule": "constant"},
        "train": {"steps": 6, "log_every": 1, "eval_every": 0, "ckpt_every": 3, "keep_last": 3},
        "lora": {"enabled": True, "rank": 4},
    }
    return write_sections(path, sections, **extra)


def quiet(*a, **k):
    pass


def test_bad_config_is_refused_before_any_work(tmp_path):
    missing = tmp_path / "no-such-checkpoint"  # never opened: the checks come first
    cfg = write_config(tmp_path / "c.toml", missing, tmp_path / "run", grpo__group_size=1)
    with pytest.raises(ConfigError, match=r"grpo.group_size = 1: must be >= 2"):
        load_grpo_config(cfg)
    code, err = cli("grpo", str(cfg))
    assert code == 2 and "grpo.group_size = 1" in err and not (tmp_path / "run").exists()
    for setting, message in (("data.batch_size=6", "multiple of grpo.group_size"),
                             ("grpo.task='poetry'", "grpo.task = 'poetry'"),
                             ("grpo.clip_eps=0", "grpo.clip_eps = 0"),
                             ("grpo.overlong_penalty=-1", "grpo.overlong_penalty = -1"),
                             ("grpo.rewards=['nope.py:f']", "no file nope.py")):
        with pytest.raises(ConfigError, match=message):
            load_grpo_config(cfg, ["grpo.group_size=4", setting])


def test_the_language_task_is_selected_from_the_config(tmp_path):
    cfg = write_config(tmp_path / "c.toml", tmp_path / "ckpt", tmp_path / "run")
    loaded = load_grpo_config(cfg, ["grpo.task='language'", "grpo.rewards=[]", "grpo.eval_problems=40"])
    assert isinstance(loaded.task, ReplyLanguage) and loaded.reward_fns == [same_language]
    mixed = load_grpo_config(cfg, ["grpo.rewards=['identity_fact', 'same_language']"])  # any task can add it
    assert mixed.reward_fns == [identity_fact, same_language]
    with pytest.raises(ConfigError, match="grpo.eval_problems = 500: the language task holds only"):
        load_grpo_config(cfg, ["grpo.task='language'", "grpo.eval_problems=500"])


def test_run_evaluates_logs_and_resumes_exactly(tmp_path, init_ckpt):  # noqa: F811
    cfg_path = write_config(tmp_path / "c.toml", init_ckpt, tmp_path / "run", grpo__beta=0.05,
                            grpo__overlong_penalty=0.25)
    result, evaluation = run_grpo(load_grpo_config(cfg_path), progress=False, log=quiet)
    assert result.stopped == "done" and result.step == 6
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert {"reward", "reward_group_std", "completion_len", "truncated", "kl", "clip_frac",
                "logp_diff_max"} <= set(r) and 0 <= r["truncated"] <= 1
        assert r["logp_diff_max"] <= 1e-4 and 0 < r["completion_len"] <= 8
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    for when in ("before", "after"):
        e = saved[when]
        assert e["problems"] == 3 and len(e["replies"]) == 3 and "mean_reward@2" in e
        assert e["pass@1"] == sum(r["reward"] >= 0.2 for r in e["replies"]) / 3
    assert (tmp_path / "run" / "reward.png").stat().st_size > 0
    # drop the last checkpoint, resume from step 3: the same rollouts, the same weights
    final = list_checkpoints(tmp_path / "run")[-1]
    weights, _ = load(final)
    shutil.move(str(final), str(tmp_path / "saved"))
    result2, _ = run_grpo(load_grpo_config(cfg_path, ["grpo.evaluate=false"]), resume=True, progress=False,
                          log=quiet)
    assert result2.step == 6
    again, _ = load(list_checkpoints(tmp_path / "run")[-1])
    assert all(torch.equal(again[k], v) for k, v in weights.items())
    resumed = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in resumed] == [r["reward"] for r in records]


def test_a_failing_reward_stops_the_run_with_its_checkpoint_intact(tmp_path, init_ckpt):  # noqa: F811
    # fails on the third step's rollouts (8 completions a step), after the step-2 checkpoint
    (tmp_path / "flaky.py").write_text("calls = []\ndef flaky(prompt, completion, answer):\n"
                                       "    calls.append(1)\n    return 1.0 if len(calls) <= 16 else None\n")
    cfg = write_config(tmp_path / "c.toml", init_ckpt, tmp_path / "run", grpo__evaluate=False,
                       grpo__rewards=[f"{tmp_path}/flaky.py:flaky"], train__ckpt_every=2)
    with pytest.raises(ChipshiftError, match=r"flaky.py:flaky returned None, not a finite number, on the completion"):
        run_grpo(load_grpo_config(cfg), progress=False, log=quiet)
    path, sidecar = latest_valid(tmp_path / "run")
    assert sidecar["meta"]["step"] == 2 and path.name.endswith("2")


def test_a_run_ended_by_its_time_limit_is_evaluated(tmp_path, init_ckpt):  # noqa: F811
    # train.max_minutes ends a run early on purpose (a budget, not a failure): the held-out
    # evaluation after training and the reward plot must still be written
    cfg_path = write_config(tmp_path / "c.toml", init_ckpt, tmp_path / "run", train__max_minutes=1e-6)
    result, evaluation = run_grpo(load_grpo_config(cfg_path), progress=False, log=quiet)
    assert result.stopped == "time limit" and result.step == 1
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["stopped"] == "time limit" and saved["steps"] == 1
    assert saved["after"]["problems"] == 3 and evaluation["after"] == saved["after"]
    assert (tmp_path / "run" / "reward.png").stat().st_size > 0
