"""The stage runners: one function per stage kind, each a thin call into the library that
does the work, returning its typed result (chipshift.pipeline.state), which the state records."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from chipshift.errors import ChipshiftError
from chipshift.pipeline.recipe import Stage, posttrain_config, training_config, write_toml
from chipshift.pipeline.state import (Context, DataResult, EvalResult, ExportResult, Interrupted, ModelResult,
                                      ServeResult, TokenizerResult, TrainingResult, resolved_target)


def _cap_per_source(corpora: dict, max_chars: int) -> list[str]:
    """Training texts, at most max_chars in all, shared evenly between the sources (a source
    with less leaves its share to the others), each source's documents in order."""
    texts_by_source = {name: [d.text for d in train] for name, (train, _) in corpora.items()}
    if not max_chars:
        return [t for texts in texts_by_source.values() for t in texts]
    sizes = {n: sum(map(len, ts)) for n, ts in texts_by_source.items()}
    budget, left = {}, max_chars
    for i, name in enumerate(sorted(sizes, key=sizes.get)):  # smallest first
        budget[name] = min(sizes[name], left // (len(sizes) - i))
        left -= budget[name]
    out = []
    for name, texts in texts_by_source.items():
        room = budget[name]
        for t in texts:
            if room <= 0:
                break
            out.append(t[:room])
            room -= len(out[-1])
    return out


def run_tokenizer(ctx: Context, st: Stage) -> TokenizerResult:
    from chipshift.data.corpora import load_corpora
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.data.tokenizer_train import compression, train_and_save

    s = st.settings
    corpora = load_corpora(s["sources"], s["files"], s["val_fraction"])
    texts = _cap_per_source(corpora, s["max_chars"])
    out = ctx.stage_dir(st)
    summary = train_and_save(texts, s["vocab_size"], out, {"sources": list(corpora),
                                                           "val_fraction": s["val_fraction"]})
    tok = Tokenizer.load(out)
    held_out = {name: compression(tok, [d.text for d in val]) for name, (_, val) in corpora.items() if val}
    metrics = {"vocab_size": summary["vocab_size"], "train_chars": summary["train_chars"]}
    for name, c in held_out.items():
        metrics[f"{name}_chars_per_token"] = c["chars_per_token"]
        if "tokens_per_cjk_char" in c:
            metrics[f"{name}_tokens_per_cjk_char"] = c["tokens_per_cjk_char"]
    return TokenizerResult(tokenizer=str(out), outputs=[out / "tokenizer.json"], metrics=metrics)


def run_data(ctx: Context, st: Stage) -> DataResult:
    from chipshift.data.shards import prepare

    tok_stage = [s for s in ctx.recipe.stages[:ctx.recipe.stages.index(st)] if s.kind == "tokenizer"][-1]
    s, out = st.settings, ctx.stage_dir(st)
    index = prepare(ctx.state.result(tok_stage.name).tokenizer, out, s["sources"], s["files"], s["val_fraction"])
    metrics = {f"{split}_tokens": info["tokens"] for split, info in index["splits"].items()}
    return DataResult(data_dir=str(out), outputs=[out / "index.json", out / "train.bin", out / "val.bin"],
                      metrics=metrics)


def run_import(ctx: Context, st: Stage) -> ModelResult:
    from chipshift.model.checkpoint import read_sidecar
    from chipshift.model.gguf import import_gguf
    from chipshift.model.hf import import_hf, is_hf_folder

    src = st.settings["source"]
    if src == "smollm2":
        from chipshift.data.packages import smollm2_gguf
        src = smollm2_gguf()
    src, out = Path(src), ctx.stage_dir(st)
    if src.suffix == ".gguf":
        import_gguf(src, out)
    elif is_hf_folder(src):
        import_hf(src, out)
    else:
        raise ChipshiftError(f"stages.{st.name}.source = {str(src)!r}: neither a .gguf file nor a "
                             f"Hugging Face folder (config.json)")
    cfg = read_sidecar(out)["model_config"]
    return ModelResult(model=str(out), outputs=[out / "model.safetensors"],
                       metrics={"params_M": round(_num_params(cfg) / 1e6, 1), "imported_from": str(src)})


def _num_params(cfg_dict: dict) -> int:
    from chipshift.model.config import ModelConfig
    return ModelConfig.from_dict(cfg_dict).num_params()



def torchrun(stage: Stage, command: str, config_path: Path, resume: bool, force: bool = False) -> None:
    """`torchrun --nproc-per-node N -m chipshift COMMAND CONFIG` in a real subprocess; a
    signal stop (exit 130) becomes Interrupted, so a re-run resumes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={stage.nproc}",
           "-m", "chipshift", command, str(config_path), "--no-progress", *(["--resume"] if resume else []),
           *(["--force"] if force else [])]
    print("  $ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # the group got the signal too: let the processes checkpoint
        rc = proc.wait()
    if rc == 130 or rc == -signal.SIGINT:
        raise Interrupted(f"{stage.name}: stopped by a signal")
    if rc != 0:
        raise ChipshiftError(f"stages.{stage.name}: torchrun exited with status {rc}")


def summarise_metrics(metrics_path: Path) -> dict:
    """Final figures of a training run from its metrics.jsonl."""
    from chipshift.train.metrics import read
    recs = read(metrics_path) if metrics_path.exists() else []
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    out: dict = {}
    if train:
        steady = train[1:] or train  # the first window holds warm-up and compilation
        out.update(steps=train[-1]["step"], first_loss=train[0]["loss"], final_loss=train[-1]["loss"],
                   tokens_per_s=sum(r["tokens_per_s"] for r in steady) / len(steady),
                   mfu=sum(r["mfu"] for r in steady) / len(steady))
        for k in train[-1]:
            if k not in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped_total"):
                out[k] = train[-1][k]
    if val:
        out.update(first_val_loss=val[0]["val_loss"], final_val_loss=val[-1]["val_loss"], val_points=len(val))
        out.update({k: v for k, v in val[-1].items() if k.startswith("val_") and k != "val_loss"})
    return out


def run_training(ctx: Context, st: Stage, command: str, start, config_path: Path | None = None) -> TrainingResult:
    """A training stage: in this process through `start(resume)`, or through torchrun
    (`chipshift COMMAND config_path`) when nproc > 1; resumes from the newest checkpoint."""
    from chipshift.train import state as train_state

    out = ctx.stage_dir(st)
    resume = train_state.latest_valid(out) is not None
    if resume:
        print(f"  resuming from {train_state.latest_valid(out)[0]}", flush=True)
    if st.nproc > 1:
        torchrun(st, command, config_path, resume, force=ctx.force and st.kind in ("sft", "dpo", "grpo"))
    else:
        result = start(resume)
        if result.stopped == "signal":
            raise Interrupted(f"{st.name}: stopped by a signal at step {result.step}")
    ckpt = train_state.latest_valid(out)[0]
    return TrainingResult(model=str(ckpt), outputs=[ckpt / "model.safetensors"],
                          metrics_file=str(out / "metrics.jsonl"), metrics=summarise_metrics(out / "metrics.jsonl"))


def run_posttrain_stage(ctx: Context, st: Stage) -> TrainingResult:
    """SFT or DPO (chipshift.train.posttrain_run) or GRPO (grpo_run) from the model of stage
    `from`; its own before/after evaluation lands in the stage's metrics."""
    from chipshift.train.grpo_run import run_grpo
    from chipshift.train.posttrain_run import run_posttrain

    out = ctx.stage_dir(st)
    config_path = out / "config.toml"
    cfg = posttrain_config(st.name, st.kind, st.settings, out_dir=out, device=st.device, dtype=st.dtype,
                           seed=ctx.recipe.seed, init=str(ctx.model_of(st)), config_path=config_path,
                           emulate=st.emulate)
    evaluation = {}

    def start(resume):
        run = run_grpo if st.kind == "grpo" else run_posttrain
        result, ev = run(cfg, resume=resume, force=ctx.force, progress=ctx.progress)
        evaluation.update(ev)
        return result

    result = run_training(ctx, st, st.kind, start, config_path=config_path)
    eval_file = out / "eval.json"
    if not evaluation and eval_file.exists():  # written by the torchrun processes
        evaluation = json.loads(eval_file.read_text())
    for when in ("before", "after"):
        for k, v in (evaluation.get(when) or {}).items():
            if isinstance(v, float):
                result.metrics[f"{k}_{when}"] = v
                if when == "after":
                    result.metrics[k] = v
    return result


def run_pretrain(ctx: Context, st: Stage) -> TrainingResult:
    from chipshift.train.loop import train

    out = ctx.stage_dir(st)
    data_stages = [s for s in ctx.recipe.stages[:ctx.recipe.stages.index(st)] if s.kind == "data"]
    data_dir = ctx.state.result(data_stages[-1].name).data_dir if data_stages else ""
    cfg = training_config(st.name, st.kind, st.settings, out_dir=out, device=st.device, dtype=st.dtype,
                          seed=ctx.recipe.seed, data_dir=data_dir, emulate=st.emulate)
    config_path = write_toml(cfg.to_dict(), out / "config.toml") if st.nproc > 1 else None
    return run_training(ctx, st, "pretrain", lambda resume: train(cfg, resume=resume, progress=ctx.progress),
                        config_path=config_path)


def run_eval(ctx: Context, st: Stage) -> EvalResult:
    """Held-out identity accuracy and preference accuracy (chipshift.train.evaluate) and
    greedy answers to the recipe's prompts, on the stage's device and dtype; with `tasks`,
    lm-eval's scores on them (and with `compare`, their delta against a second target)."""
    import torch

    from chipshift.data.chat import encode_preference, preference_pair
    from chipshift.data.posttrain_data import dpo_pairs
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.devices import get_device, parse_dtype
    from chipshift.model.checkpoint import load_checkpoint
    from chipshift.train.evaluate import answer, identity_accuracy, preference_accuracy
    from chipshift.train.posttrain import PairRows

    s, ckpt = st.settings, ctx.model_of(st)
    device, dtype = resolved_target(st.device, st.dtype, st.emulate)
    dev = get_device(device, st.emulate)
    model, _ = load_checkpoint(ckpt, device=dev.torch_device, dtype=parse_dtype(dtype))
    model.eval()
    tok = Tokenizer.load(ckpt)
    metrics, samples, t0 = {}, [], time.perf_counter()
    with torch.no_grad(), dev.numerics():
        if s["identity"]:
            metrics["identity_accuracy"], rows = identity_accuracy(model, tok, s["max_new_tokens"])
            samples += [{"prompt": r["question"], "answer": r["reply"]} for r in rows[:3]]
        if s["preference"]:
            held_out = dpo_pairs(split="val", limit_per_source=s["pairs"])
            pairs = [encode_preference(tok, preference_pair(p)) for p in held_out]
            pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
            stream = PairRows(pairs, min(model.cfg.max_seq_len, 512), pad, shuffle=False)
            metrics.update(preference_accuracy(model, stream))
            metrics["preference_pairs"] = len(stream.pairs)
        for prompt in s["prompts"]:
            samples.append({"prompt": prompt, "answer": answer(model, tok, prompt, s["max_new_tokens"])})
    for k, v in metrics.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}", flush=True)
    del model
    harness = harness_eval(ckpt, st, device, dtype, metrics) if s["tasks"] else None
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    return EvalResult(metrics=metrics, samples=samples, harness=harness)


def harness_eval(ckpt: Path, st: Stage, device: str, dtype: str, metrics: dict) -> dict:
    """The stage's lm-eval tasks against `chipshift serve` on its target and, with `compare`, on
    that target too: scores without their per-item lists, the delta with its bootstrap interval
    (also written into the checkpoint's certificate, when a handoff made one)."""
    from chipshift.parity.certificate import add_to_certificate
    from chipshift.parity.dump import parse_target
    from chipshift.parity.harness import evaluate_checkpoint, format_delta, score_delta

    s = st.settings
    kw = dict(limit=s["limit"] or None, log=lambda line: print("  " + line, flush=True))
    runs = [evaluate_checkpoint(ckpt, s["tasks"], device, dtype, **kw)]
    if s["compare"]:
        other_device, other_dtype = parse_target(s["compare"])
        runs.append(evaluate_checkpoint(ckpt, s["tasks"], other_device, None if other_dtype == "auto" else other_dtype,
                                        **kw))
    for task, row in runs[0]["tasks"].items():
        metrics.update({f"{task}_{m}": row[m] for m in ("acc", "acc_norm") if m in row})
    out = {"runs": [{**r, "tasks": {t: {k: v for k, v in row.items() if k != "items"} for t, row in r["tasks"].items()}}
                    for r in runs]}
    if len(runs) == 2:
        out["delta"] = score_delta(*runs)
        for line in format_delta(out["delta"]):
            print("  delta " + line, flush=True)
        add_to_certificate(ckpt, eval_delta=out["delta"])
    return out


def run_serve(ctx: Context, st: Stage) -> ServeResult:
    """With `check`, first the trainer-to-server check on the stage's device and dtype
    (chipshift.parity.serve_check; a failure fails the stage, naming the requests); then
    `chipshift serve` in a subprocess on 127.0.0.1 (a free port, chipshift.infer.cli.served), a
    few chat requests through the official `openai` client, then the server is stopped."""
    from openai import OpenAI

    from chipshift.infer.cli import served
    from chipshift.parity.certificate import add_to_certificate
    from chipshift.parity.serve_check import serve_check, summary

    ckpt = ctx.model_of(st)
    device, dtype = resolved_target(st.device, st.dtype, st.emulate)
    check = None
    if st.settings["check"] and st.emulate:
        print(f"  check: skipped (the serving check compares two real computations; this stage emulates "
              f"{st.emulate})", flush=True)
    elif st.settings["check"]:
        check = serve_check(ckpt, device, dtype, log=lambda line: print("  " + line, flush=True))
        if check["verdict"] == "fail":
            raise ChipshiftError(f"{summary(check)}; failing: {' | '.join(check['failures'])}")
        add_to_certificate(ckpt, serve_check=check)
    name = f"{ctx.recipe.name}-{st.source}"
    answers, tokens = [], 0
    with served(ckpt, device, dtype, max_batch=st.settings["max_batch"], model_name=name, emulate=st.emulate,
                log=lambda line: print(line, flush=True)) as base_url:
        port = int(base_url.rsplit(":", 1)[1].split("/")[0])
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        t0 = time.perf_counter()
        for prompt in st.settings["prompts"]:
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=st.settings["max_tokens"], temperature=0)
            text = reply.choices[0].message.content
            tokens += reply.usage.completion_tokens
            answers.append({"prompt": prompt, "answer": text})
            print(f"  > {prompt}\n    {text.strip()}", flush=True)
        seconds = time.perf_counter() - t0
    return ServeResult(samples=answers, check=check,
                       metrics={"requests": len(answers), "completion_tokens": tokens,
                                "tokens_per_s": tokens / seconds if seconds else None, "port": port},
                       command=f"chipshift chat {ckpt}    (or: chipshift serve {ckpt})")


def run_export(ctx: Context, st: Stage) -> ExportResult:
    """Hugging Face folder; with check_transformers, `transformers` loads it and its greedy
    tokens must equal chipshift's own (float32 on the CPU, both sides)."""
    from chipshift.model.hf import export_hf

    ckpt, out = ctx.model_of(st), ctx.stage_dir(st)
    export_hf(ckpt, out)
    result = ExportResult(export=str(out), outputs=[out / "model.safetensors"], metrics={"format": "hf"})
    if st.settings["check_transformers"]:
        check = transformers_greedy_check(ckpt, out, st.settings["prompt"], st.settings["max_new_tokens"])
        result.metrics.update(transformers_loads=True, same_greedy_tokens=check["same"],
                                 greedy_tokens=len(check["chipshift"]))
        result.samples = [{"prompt": st.settings["prompt"], "answer": check["text"], "who": "transformers"}]
        print(f"  transformers greedy tokens {'==' if check['same'] else '!='} chipshift's: {check['text']!r}")
        if not check["same"]:
            raise ChipshiftError(f"stages.{st.name}: transformers generates {check['transformers']} but "
                                 f"chipshift {check['chipshift']} from the export {out}")
    return result


def transformers_greedy_check(ckpt: Path, hf_dir: Path, prompt: str, max_new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from chipshift.data.tokenizer import Tokenizer
    from chipshift.model.checkpoint import load_checkpoint
    from chipshift.model.generate import encode_prompt, generate_naive

    tok = Tokenizer.load(ckpt)
    ids = encode_prompt(tok, prompt, chat=True)
    stops = set(tok.stop_ids())

    def until_stop(tokens: list[int]) -> list[int]:
        for i, t in enumerate(tokens):
            if t in stops:
                return tokens[:i + 1]
        return tokens

    model, _ = load_checkpoint(ckpt, device="cpu", dtype=torch.float32)
    ours = until_stop(list(generate_naive(model.eval(), ids, max_new_tokens, stop_ids=stops)))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=sorted(stops), pad_token_id=tok.pad_id if tok.pad_id is not None else 0)
    theirs = until_stop(gen[0, len(ids):].tolist())
    return {"same": ours == theirs, "chipshift": ours, "transformers": theirs, "text": tok.decode(theirs)}

