"""GRPO on the one loop: a config, its task, and one run. `chipshift grpo CONFIG.toml`
(`chipshift.train.posttrain_cli`) runs it; the loss is `chipshift.train.grpo`'s.

The config is a training config ([run] [data] [optim] [train], as for `sft`; no [model]) plus:

    [grpo]
      init              the checkpoint to start from (its tokenizer and chat template are used;
                        it is the KL reference)
      task              arithmetic | arithmetic_tagged | identity | language (`chipshift.train.rewards`)
      digits            arithmetic: operands of up to this many digits (default 2)
      rewards           reward functions summed per completion: built-in names,
                        "module:function" or "file.py:function"; default: the task's
      group_size        completions per prompt, G >= 2 (default 4)
      max_new_tokens    the longest completion (default 16)
      temperature, top_p, top_k   rollout sampling (default 1.0, 1.0, 0)
      clip_eps          the ratio clip (default 0.2)
      overlong_penalty  subtracted from the reward of a completion cut off at max_new_tokens
                        (no stop token): DAPO's overlong punishment; 0 (default) leaves it as scored
      oversample        F >= 1: sample F x the step's prompts and train on those whose group's rewards
                        differ first (DAPO's dynamic sampling); 1 (default) trains on all it samples
      beta              the KL coefficient; 0 (default) needs no reference
      rollout_slots     the engine's concurrent sequences; 0 (default): data.batch_size x oversample
      force             start even if the init checkpoint's last handoff failed
      evaluate          held-out evaluation before and after (default true)
      eval_problems     held-out problems (default 50)
      eval_samples      k: samples per problem for the mean reward (default 4)
      pass_reward       a greedy reply passes when its reward reaches this (default 1.0)
    [lora]
      enabled, rank, alpha, dropout, targets (see `chipshift.model.lora`)

`data.batch_size` counts completions per optimizer step (prompts x group_size) and
`data.seq_len` the longest prompt plus completion (the engine's cache length). After the
run, RUN/eval.json holds the held-out pass@1 and mean reward before and after, and
RUN/reward.png the reward curve. With several processes (torchrun) each samples the whole
step's rollouts (the same ones: seeded, from equal weights) and trains on its share.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from chipshift.errors import ConfigError
from chipshift.model.lora import LoRAConfig
from chipshift.train.config import SECTIONS, TrainConfig, apply_overrides, parse_section, read_toml
from chipshift.train.posttrain_run import common_sections
from chipshift.train.rewards import build_task, load_reward


@dataclass
class GRPOSection:
    init: str = ""
    task: str = "arithmetic"
    digits: int = 2
    rewards: list[str] = field(default_factory=list)
    group_size: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    clip_eps: float = 0.2
    overlong_penalty: float = 0.0
    oversample: int = 1
    beta: float = 0.0
    rollout_slots: int = 0
    force: bool = False
    evaluate: bool = True
    eval_problems: int = 50
    eval_samples: int = 4
    pass_reward: float = 1.0


@dataclass
class GRPOConfig:
    train: TrainConfig
    grpo: GRPOSection = field(default_factory=GRPOSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    task: object = None
    reward_fns: list = field(default_factory=list)


def load_grpo_config(path: str | Path, overrides: list[str] = ()) -> GRPOConfig:
    """Parse and check a `grpo` config, and load its task and reward functions."""
    raw = apply_overrides(read_toml(path), list(overrides))
    unknown = sorted(set(raw) - set(SECTIONS) - {"grpo", "lora", "model"})
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] in a `chipshift grpo` config; allowed: "
                          f"{', '.join([*SECTIONS, 'grpo', 'lora'])}")
    g = parse_section(raw, "grpo", GRPOSection, lists=("rewards",))
    if g.group_size < 2:
        raise ConfigError(f"grpo.group_size = {g.group_size}: must be >= 2 (advantages compare the "
                          "completions of a group)")
    for key in ("max_new_tokens", "eval_problems", "digits", "oversample"):
        if getattr(g, key) < 1:
            raise ConfigError(f"grpo.{key} = {getattr(g, key)}: must be >= 1")
    for key, value, ok, allowed in (("clip_eps", g.clip_eps, 0 < g.clip_eps < 1, "in (0, 1)"),
                                    ("beta", g.beta, g.beta >= 0, ">= 0"),
                                    ("overlong_penalty", g.overlong_penalty, g.overlong_penalty >= 0, ">= 0"),
                                    ("temperature", g.temperature, g.temperature > 0, "> 0"),
                                    ("top_p", g.top_p, 0 < g.top_p <= 1, "in (0, 1]"),
                                    ("top_k", g.top_k, g.top_k >= 0, ">= 0 (0: off)"),
                                    ("rollout_slots", g.rollout_slots, g.rollout_slots >= 0, ">= 0"),
                                    ("eval_samples", g.eval_samples, g.eval_samples >= 0, ">= 0")):
        if not ok:
            raise ConfigError(f"grpo.{key} = {value}: must be {allowed}")
    train, lora = common_sections(raw, "grpo", g.init)
    if train.data.batch_size % g.group_size:
        raise ConfigError(f"data.batch_size = {train.data.batch_size}: counts completions per step and must be a "
                          f"multiple of grpo.group_size ({g.group_size})")
    if train.data.seq_len <= g.max_new_tokens:
        raise ConfigError(f"data.seq_len = {train.data.seq_len}: must hold a prompt and grpo.max_new_tokens "
                          f"({g.max_new_tokens}) tokens")
    task = build_task(g.task, g.digits)
    if g.evaluate:
        task.held_out(g.eval_problems)  # enough of them, before any work
    reward_fns = [load_reward(spec) for spec in (g.rewards or task.rewards)]
    return GRPOConfig(train, g, lora, task, reward_fns)


def run_grpo(cfg: GRPOConfig, *, resume: bool = False, force: bool = False, progress: bool = True,
             log=print) -> tuple:
    """Set up and run one GRPO run; returns (TrainResult, evaluation dict)."""
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.devices import get_device
    from chipshift.model.checkpoint import check_handoff_allowed, load_checkpoint
    from chipshift.model.lora import apply_lora
    from chipshift.train import distributed
    from chipshift.train.grpo import GRPO, Rollouts, Sampler, evaluate
    from chipshift.train.loop import train
    from chipshift.train.metrics import plot_curves

    tcfg, g = cfg.train, cfg.grpo
    check_handoff_allowed(g.init, force=force or g.force)
    tok = Tokenizer.load(g.init)
    model, _ = load_checkpoint(g.init, "cpu", torch.float32)
    if tcfg.data.seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"data.seq_len = {tcfg.data.seq_len}: the model's max_seq_len is {model.cfg.max_seq_len}")
    run_dir = Path(tcfg.run.out)
    device = get_device(tcfg.run.device, tcfg.run.emulate)
    world = distributed.init(device)
    try:
        model.to(device.torch_device)
        sampler = Sampler(model, tok, device, tcfg.data.seq_len,
                          g.rollout_slots or tcfg.data.batch_size * g.oversample)
        held_out = cfg.task.held_out(g.eval_problems)

        def held_out_eval():
            return evaluate(sampler, held_out, cfg.reward_fns, samples=g.eval_samples,
                            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                            pass_reward=g.pass_reward)
        evaluation = {}
        if world.is_main and g.evaluate:
            evaluation["before"] = held_out_eval()
            log(f"held-out before: pass@1 {evaluation['before']['pass@1']:.3f}")
        sampler.reset()  # the trainer may hold the model in another dtype
        reference = copy.deepcopy(model).requires_grad_(False) if g.beta and not cfg.lora.enabled else None
        if cfg.lora.enabled:
            apply_lora(model, cfg.lora, tcfg.run.seed)
        pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
        stream = Rollouts(sampler, cfg.task, cfg.reward_fns, group_size=g.group_size,
                          batch_size=tcfg.data.batch_size, max_new_tokens=g.max_new_tokens,
                          temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=tcfg.run.seed,
                          beta=g.beta, reference=reference, pad_id=pad, overlong_penalty=g.overlong_penalty,
                          oversample=g.oversample)
        result = train(tcfg, GRPO(g.clip_eps, g.beta), stream, None, resume=resume, model=model,
                       tokenizer_dir=g.init, progress=progress, log=log, device=device)
        # a run ended by train.max_minutes is a finished run too: it is evaluated like one
        if world.is_main and result.stopped != "signal":
            if g.evaluate:
                evaluation["after"] = held_out_eval()
            png = plot_curves(run_dir / "metrics.jsonl", run_dir / "reward.png",
                              [("reward", "mean reward", ".-"), ("reward_group_std", "within-group std", ".-")],
                              "reward", f"grpo on {g.task}")
            evaluation["reward_png"] = str(png)
            (run_dir / "eval.json").write_text(json.dumps(
                {"kind": "grpo", "init": g.init, "checkpoint": str(result.checkpoint), "steps": result.step,
                 "stopped": result.stopped, "grpo": asdict(g),
                 "lora": asdict(cfg.lora), **evaluation}, indent=2, ensure_ascii=False))
        return result, evaluation
    finally:
        distributed.shutdown(world)
