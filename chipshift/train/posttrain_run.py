"""Post-training on the one loop: an SFT or DPO config, its data, and one run.
The commands `chipshift sft` / `chipshift dpo` (`chipshift.train.posttrain_cli`) and
the pipeline's sft and dpo stages run it.

The config is a training config ([run] [data] [optim] [train], as for `pretrain`; see
`chipshift.train.config`) plus:

    [sft] or [dpo]
      init              the checkpoint to start from (any chipshift checkpoint: pre-trained
                        here, or imported with `chipshift import`); its tokenizer and chat
                        template are used, and it is the DPO reference model
      data              built-in sources ("identity,chatterbot,chitchat") or a JSONL file
                        (SFT: {"messages": [...]} per line; DPO: {"prompt", "chosen",
                        "rejected"} or full conversations per line)
      val_data          held-out JSONL; default: the built-in held-out split, or every 20th
                        record of a JSONL `data`
      limit_per_source  keep the first N chatterbot / chitchat conversations (0 = all)
      identity_repeats  SFT: how many times the identity set is repeated
      beta              DPO: the strength of the KL constraint (default 0.1)
      force             start even if the init checkpoint's last handoff failed
      evaluate          run the evaluation before and after (default true)
      eval_max_new_tokens  the longest generated identity answer (default 32)
    [lora]
      enabled, rank, alpha, dropout, targets (see `chipshift.model.lora`)

`data.seq_len` is the packing length (SFT) or the longest row (DPO; longer examples are
cut); `data.batch_size` counts packed rows (SFT) or pairs (DPO) per optimizer step.
After training the evaluation of `chipshift.train.evaluate` runs on the init model and on
the result, and is written to RUN/eval.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from chipshift.errors import ConfigError
from chipshift.model.lora import LoRAConfig
from chipshift.train.config import SECTIONS, TrainConfig, apply_overrides, from_dict, parse_section, read_toml


@dataclass
class PostTrainSection:
    init: str = ""
    data: str = "identity,chatterbot,chitchat"
    val_data: str = ""
    limit_per_source: int = 0
    identity_repeats: int = 1
    beta: float = 0.1
    force: bool = False
    evaluate: bool = True
    eval_max_new_tokens: int = 32


@dataclass
class PostTrainConfig:
    kind: str  # "sft" | "dpo"
    train: TrainConfig
    post: PostTrainSection = field(default_factory=PostTrainSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


def load_posttrain_config(kind: str, path: str | Path, overrides: list[str] = ()) -> PostTrainConfig:
    """Parse and check a `sft` / `dpo` config; `--set` works on every section."""
    raw = apply_overrides(read_toml(path), list(overrides))
    other = "dpo" if kind == "sft" else "sft"
    if other in raw:
        raise ConfigError(f"[{other}] in a `chipshift {kind}` config: use [{kind}]")
    post = parse_section(raw, kind, PostTrainSection)
    if kind == "sft" and post.beta != PostTrainSection.beta:
        raise ConfigError("sft.beta: beta is a DPO setting")
    if post.beta <= 0:
        raise ConfigError(f"dpo.beta = {post.beta}: must be > 0")
    train, lora = common_sections(raw, kind, post.init)
    return PostTrainConfig(kind, train, post, lora)


def common_sections(raw: dict, kind: str, init: str) -> tuple[TrainConfig, LoRAConfig]:
    """The training sections and [lora] of a post-training config (sft, dpo, grpo), checked;
    there is no [model]: the model is the init checkpoint's."""
    if "model" in raw:
        raise ConfigError(f"[model] in a `chipshift {kind}` config: the model is {kind}.init's")
    lora = parse_section(raw, "lora", LoRAConfig, lists=("targets",))
    if lora.enabled:
        lora.check()
    if not init:
        raise ConfigError(f"{kind}.init = '': set it to a chipshift checkpoint directory")
    raw.setdefault("run", {}).setdefault("out", f"runs/{kind}")
    train = from_dict({k: v for k, v in raw.items() if k in SECTIONS})
    if train.run.parallel != "ddp":
        # the evaluation after training runs the model on the main process alone, and LoRA
        # merges whole weights: neither works on a sharded model yet
        raise ConfigError(f"run.parallel = {train.run.parallel!r}: `chipshift {kind}` supports only 'ddp'")
    return train, lora


# -- data ---------------------------------------------------------------------------------------
def _is_file(spec: str) -> bool:
    return spec.endswith(".jsonl") or Path(spec).is_file()


def sft_conversations(post: PostTrainSection) -> tuple[list, list]:
    from chipshift.data import posttrain_data as pd

    limit = post.limit_per_source or None
    if _is_file(post.data):
        convs = pd.load_sft_jsonl(post.data)
        if post.val_data:
            return convs, pd.load_sft_jsonl(post.val_data)
        return [c for i, c in enumerate(convs) if i % 20 != 19], [c for i, c in enumerate(convs) if i % 20 == 19]
    val = pd.load_sft_jsonl(post.val_data) if post.val_data else pd.sft_conversations(post.data, "val", limit)
    return pd.sft_conversations(post.data, "train", limit, post.identity_repeats), val


def preference_pairs(post: PostTrainSection) -> tuple[list, list]:
    from chipshift.data import posttrain_data as pd
    from chipshift.data.chat import preference_pair

    if _is_file(post.data):
        pairs = pd.load_preference_jsonl(post.data)
        if post.val_data:
            return pairs, pd.load_preference_jsonl(post.val_data)
        return [p for i, p in enumerate(pairs) if i % 20 != 19], [p for i, p in enumerate(pairs) if i % 20 == 19]
    limit = post.limit_per_source or None
    built = [[preference_pair(r) for r in pd.dpo_pairs(post.data, split, limit)] for split in ("train", "val")]
    if post.val_data:
        built[1] = pd.load_preference_jsonl(post.val_data)
    return built[0], built[1]


def build_streams(cfg: PostTrainConfig, tok, seed: int):
    """(train stream, val stream) of packed rows (SFT) or pairs (DPO)."""
    from chipshift.data.chat import encode_preference
    from chipshift.train.posttrain import PackedRows, PairRows, pack_conversations

    seq_len = cfg.train.data.seq_len
    if cfg.kind == "sft":
        train, val = sft_conversations(cfg.post)
        return (PackedRows(pack_conversations(tok, train, seq_len), seed),
                PackedRows(pack_conversations(tok, val, seq_len), shuffle=False) if val else None)
    train, val = preference_pairs(cfg.post)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    streams = [PairRows([encode_preference(tok, p) for p in pairs], seq_len, pad, seed=seed, shuffle=shuffle)
               for pairs, shuffle in ((train, True), (val, False)) if pairs]
    return streams[0], (streams[1] if len(streams) > 1 else None)


# -- a run --------------------------------------------------------------------------------------
def _evaluate(cfg: PostTrainConfig, model, tok, val_stream) -> dict:
    from chipshift.train.evaluate import identity_accuracy, preference_accuracy

    if cfg.kind == "sft":
        acc, rows = identity_accuracy(model, tok, cfg.post.eval_max_new_tokens)
        return {"identity_accuracy": acc, "identity": rows}
    return preference_accuracy(model, val_stream) if val_stream else {}


def run_posttrain(cfg: PostTrainConfig, *, resume: bool | str = False, force: bool = False,
                  progress: bool = True, log=print) -> tuple:
    """Set up and run one SFT or DPO run; returns (TrainResult, evaluation dict)."""
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.devices import get_device
    from chipshift.model.checkpoint import check_handoff_allowed, load_checkpoint
    from chipshift.model.lora import apply_lora
    from chipshift.train import distributed
    from chipshift.train.loop import train
    from chipshift.train.posttrain import DPO, SFT, cached_reference, compute_reference

    tcfg, post = cfg.train, cfg.post
    check_handoff_allowed(post.init, force=force or post.force)
    tok = Tokenizer.load(post.init)
    model, sidecar = load_checkpoint(post.init, "cpu", torch.float32)
    if tcfg.data.seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"data.seq_len = {tcfg.data.seq_len}: the model's max_seq_len is {model.cfg.max_seq_len}")
    train_stream, val_stream = build_streams(cfg, tok, tcfg.run.seed)
    if cfg.kind == "dpo":
        for name, stream in (("training", train_stream), ("held-out", val_stream)):
            if stream is not None and stream.dropped:
                log(f"{name} pairs: {stream.dropped} of {stream.dropped + len(stream.pairs)} dropped (no reply "
                    f"token within data.seq_len = {tcfg.data.seq_len}, or chosen and rejected the same once cut "
                    "to it)")
    run_dir = Path(tcfg.run.out)
    device = get_device(tcfg.run.device, tcfg.run.emulate)
    world = distributed.init(device, tcfg.run.collective_timeout_s)
    try:
        evaluation = {}
        if world.is_main and post.evaluate:
            model.to(device.torch_device)
            with device.numerics():
                evaluation["before"] = _evaluate(cfg, model, tok, val_stream)
        if cfg.kind == "dpo":
            ref_hash = sidecar["files"]["model.safetensors"]["sha256"]
            model.to(device.torch_device)
            for stream in (s for s in (train_stream, val_stream) if s is not None):
                if world.is_main:
                    with device.numerics():
                        _, path, computed = cached_reference(run_dir, stream, ref_hash, lambda s=stream: compute_reference(
                            model, s, max(1, tcfg.data.micro_batch or tcfg.data.batch_size), device.torch_device,
                            progress))
                    log(f"reference log-probs {'computed' if computed else 'loaded'}: {path}")
                distributed.barrier(world)
                stream.ref_logps = cached_reference(run_dir, stream, ref_hash, lambda: None)[0]
            objective = DPO(post.beta)
        else:
            objective = SFT()
        if cfg.lora.enabled:
            apply_lora(model, cfg.lora, tcfg.run.seed)
        result = train(tcfg, objective, train_stream, val_stream, resume=resume, model=model,
                       tokenizer_dir=post.init, progress=progress, log=log, device=device)
        if world.is_main and result.stopped != "signal":  # "time limit" (train.max_minutes) too
            if post.evaluate:
                with device.numerics():
                    evaluation["after"] = _evaluate(cfg, model, tok, val_stream)
            evaluation["val_loss"] = result.last_val_loss
            (run_dir / "eval.json").write_text(json.dumps(
                {"kind": cfg.kind, "init": post.init, "checkpoint": str(result.checkpoint), "steps": result.step,
                 "stopped": result.stopped,
                 "post": asdict(post), "lora": asdict(cfg.lora), **evaluation}, indent=2, ensure_ascii=False))
        return result, evaluation
    finally:
        distributed.shutdown(world)
