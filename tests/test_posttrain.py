"""SFT and DPO on the one loop: exact masking, packing = no packing, the DPO loss by hand,
the reference cache, resume, CLI errors, and quick end-to-end runs on a tiny model."""

import contextlib
import io
import json
import math
import shutil

import pytest
import torch

from chipshift.data.chat import IGNORE_INDEX, encode_chat, encode_preference, pack, preference_pair
from chipshift.data.posttrain_data import identity_conversations, identity_correct, identity_eval, sft_conversations
from chipshift.cli import main
from chipshift.data.tokenizer_train import train_tokenizer
from chipshift.model.checkpoint import load_checkpoint, save_checkpoint, update_sidecar
from chipshift.model.config import ModelConfig
from chipshift.model.transformer import build_model
from chipshift.train.posttrain import (DPO, SFT, PackedRows, PairRows, cached_reference, compute_reference,
                                       dpo_loss, sequence_logps, target_logps)
from chipshift.train.posttrain_run import load_posttrain_config, run_posttrain
from chipshift.train.state import list_checkpoints, load

CONVS = sft_conversations(("identity", "chatterbot"), "train", limit_per_source=40)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    texts = [m["content"] for c in CONVS for m in c] * 3
    tok = train_tokenizer(texts, 600, show_progress=False)
    out = tmp_path_factory.mktemp("tok")
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from chipshift.data.tokenizer import Tokenizer
    return Tokenizer.load(tok_dir)


def tiny_cfg(vocab):
    return ModelConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, max_seq_len=256)


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tiny_cfg(tok.vocab_size), seed=3)


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory, tok_dir, model):
    return save_checkpoint(model, tmp_path_factory.mktemp("init") / "ckpt", tokenizer_dir=tok_dir)


def test_no_gradient_from_prompt_or_padding_tokens(tok, model):
    packed = pack([encode_chat(tok, c) for c in CONVS[:12]], 96, tok.pad_id)
    batch = PackedRows(packed, shuffle=False).batch(0, packed.input_ids.shape[0])
    assert (packed.example_ids == -1).any() and (batch["labels"] == IGNORE_INDEX).any()
    grabbed = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            grabbed[name] = out
        return hook
    handles = [model.norm.register_forward_hook(keep("hidden")), model.embed_tokens.register_forward_hook(keep("embed"))]
    try:
        loss, _ = SFT()(model, batch)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    ignored = batch["labels"] == IGNORE_INDEX
    hidden_grad = grabbed["hidden"].grad.abs().sum(-1)
    assert torch.all(hidden_grad[ignored] == 0)  # no loss from prompt, headers or padding
    assert torch.all(hidden_grad[~ignored] > 0)
    padding = packed.example_ids == -1
    assert torch.all(grabbed["embed"].grad.abs().sum(-1)[padding] == 0)  # padding feeds nothing
    # other padding ids change nothing at all
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(padding, 7))
    with torch.no_grad():
        assert torch.equal(SFT()(model, other)[0], SFT()(model, batch)[0])


def test_packed_rows_give_the_unpacked_per_example_loss(tok, model):
    examples = [encode_chat(tok, c) for c in CONVS[:16]]
    packed = pack(examples, 128, tok.pad_id)
    assert packed.input_ids.shape[0] < len(examples)  # really packed
    with torch.no_grad():
        logp, rows = target_logps(model, {"input_ids": packed.input_ids, "labels": packed.labels,
                                          "positions": packed.positions, "segment_ids": packed.segment_ids})
        owner = packed.example_ids[packed.labels != IGNORE_INDEX]
        for i, ex in enumerate(examples):
            alone = pack([ex], len(ex), tok.pad_id)
            ref, _ = target_logps(model, {"input_ids": alone.input_ids, "labels": alone.labels})
            mine = logp[owner == i]
            assert len(mine) == len(ref)
            a, b = -mine.mean().item(), -ref.mean().item()
            assert abs(a - b) / abs(b) <= 1e-5, (i, a, b)


def test_dpo_loss_by_hand():
    beta = 0.5
    chosen, rejected = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    ref_c, ref_r = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0])
    loss, m = dpo_loss(chosen, rejected, ref_c, ref_r, beta)
    # pair 1: rewards 0.5 and -0.5, margin 1; pair 2: rewards -0.5 and 0.5, margin -1
    want = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert m["reward_acc"].item() == 0.5 and m["reward_margin"].item() == pytest.approx(0.0)
    assert m["chosen_reward"].item() == pytest.approx(0.0) and m["chosen_logp"].item() == pytest.approx(-2.5)
    # beta scales the margin: with beta 2 the first pair's loss is log(1 + e^-4)
    loss2, _ = dpo_loss(chosen[:1], rejected[:1], ref_c[:1], ref_r[:1], 2.0)
    assert loss2.item() == pytest.approx(math.log1p(math.exp(-4.0)), rel=1e-6)


def test_pairs_that_differ_only_beyond_seq_len_are_dropped(tok):
    """Cut to seq_len, a long reply and its truncated copy can become the same row: such a
    pair teaches nothing and would count as a tie in the preference accuracy."""
    long = " ".join(["word"] * 60)
    record = {"prompt": CONVS[0][:-1], "chosen": long + " and the end.", "rejected": long}
    pairs = [encode_preference(tok, preference_pair(record)) for _ in range(2)]
    pairs[1] = encode_preference(tok, preference_pair({**record, "rejected": "No."}))
    assert len(pairs[0][0]) > 40 and pairs[0][0] != pairs[0][1]
    stream = PairRows(pairs, 40, tok.pad_id, shuffle=False)
    assert stream.dropped == 1 and len(stream.pairs) == 1
    assert PairRows(pairs, 4096, tok.pad_id, shuffle=False).dropped == 0


def test_preference_accuracy_by_hand_per_token_and_summed(tok, model):
    """Each pair scored by a full log-softmax over the vocabulary, independent of the
    evaluator's path: mean log-prob per reply token decides `preference_accuracy`, the sum
    `preference_accuracy_sum`; the short rejected replies make the two disagree."""
    from chipshift.train.evaluate import preference_accuracy

    records = [{"prompt": c[:-1], "chosen": c[-1]["content"], "rejected": r}
               for c, r in zip(CONVS[:6], ("No.", "Hm", CONVS[9][-1]["content"], "Yes, of course.", "ok", "Sure"))]
    stream = PairRows([encode_preference(tok, preference_pair(r)) for r in records], 256, tok.pad_id,
                      shuffle=False)
    assert len(stream.pairs) == 6

    def by_hand(ex):
        ids = torch.tensor(ex.ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None])[0].float(), dim=-1)
        picked = [logp[i - 1, ids[i]].item() for i in range(1, len(ex.ids)) if ex.mask[i]]
        return sum(picked), sum(picked) / len(picked)

    scores = [(by_hand(c), by_hand(r)) for c, r in stream.pairs]
    per_token = sum(c[1] > r[1] for c, r in scores) / 6
    summed = sum(c[0] > r[0] for c, r in scores) / 6
    assert per_token != summed  # the case tells the two apart
    got = preference_accuracy(model, stream, batch_pairs=4)  # a short last batch too
    assert got == {"preference_accuracy": per_token, "preference_accuracy_sum": summed}


def test_dpo_starts_at_log2_and_its_gradient_scales_with_beta(tok, model):
    pairs = [encode_preference(tok, preference_pair(
        {"prompt": c[:-1], "chosen": c[-1]["content"], "rejected": "No."})) for c in CONVS[:4]]
    stream = PairRows(pairs, 128, tok.pad_id, shuffle=False)
    stream.ref_logps = compute_reference(model, stream, 2, "cpu", progress=False)
    batch = stream.batch(0, 4)
    grads = {}
    for beta in (0.1, 0.4):
        loss, metrics = DPO(beta)(model, batch)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
        assert metrics["reward_acc"].item() == 0.0
        loss.backward()
        grads[beta] = model.embed_tokens.weight.grad.clone()
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0.4], 4 * grads[0.1], rtol=1e-4, atol=1e-8)


def test_reference_cache_is_keyed_by_data_and_reference(tmp_path, tok, model):
    def stream_of(replies):
        pairs = [encode_preference(tok, preference_pair({"prompt": c[:-1], "chosen": c[-1]["content"],
                                                          "rejected": r})) for c, r in zip(CONVS, replies)]
        return PairRows(pairs, 128, tok.pad_id, shuffle=False)
    a = stream_of(["No.", "Maybe.", "Never."])
    calls = []

    def compute(s=a):
        calls.append(1)
        return compute_reference(model, s, 2, "cpu", progress=False)
    first, path, computed = cached_reference(tmp_path, a, "ref1", compute)
    assert computed and path.exists() and first.shape == (3, 2)
    again, path2, computed2 = cached_reference(tmp_path, a, "ref1", compute)
    assert not computed2 and path2 == path and torch.equal(again, first) and len(calls) == 1
    assert cached_reference(tmp_path, a, "ref2", compute)[1] != path  # another reference
    b = stream_of(["No.", "Maybe.", "Not at all."])
    assert cached_reference(tmp_path, b, "ref1", lambda: compute(b))[1] != path  # other data
    with torch.no_grad():
        direct = sequence_logps(model, a.rows([0, 1, 2]))
    torch.testing.assert_close(first[:, 0], direct[:3])


def small_data(path, kind):
    """20 records of the built-in data as a JSONL file (the last one is held out)."""
    from chipshift.data.posttrain_data import dpo_pairs
    records = ([{"messages": c} for c in CONVS[:20]] if kind == "sft" else
               [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in dpo_pairs(("identity",))[:20]])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_config(path, kind, init, out, **extra):
    sections = {
        "run": {"out": str(out), "device": "cpu", "dtype": "float32", "seed": 1},
        kind: {"init": str(init), "data": str(small_data(path.with_suffix(".jsonl"), kind)),
               "eval_max_new_tokens": 4},
        "data": {"seq_len": 128, "batch_size": 4},
        "optim": {"warmup_steps": 0, "lr": 3e-3, "schedule": "constant"},
        "train": {"steps": 6, "log_every": 1, "eval_every": 0, "ckpt_every": 3, "keep_last": 3, "eval_batches": 1},
        "lora": {},
    }
    return write_sections(path, sections, **extra)


def write_sections(path, sections, **extra):
    """Write a TOML config; `section__key=value` overrides or adds a key."""
    for key, value in extra.items():
        section, name = key.split("__")
        sections[section][name] = value
    path.write_text("".join(f"[{n}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in vals.items())
                            for n, vals in sections.items()))
    return path


@pytest.mark.parametrize("kind,lora", [("sft", False), ("dpo", True)])
def test_run_learns_and_resumes_exactly(tmp_path, init_ckpt, kind, lora):
    cfg_path = write_config(tmp_path / "c.toml", kind, init_ckpt, tmp_path / "run", lora__enabled=lora,
                            lora__rank=4, **({"dpo__beta": 0.5} if kind == "dpo" else {}))
    cfg = load_posttrain_config(kind, cfg_path)
    result, evaluation = run_posttrain(cfg, progress=False, log=lambda *a: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    if kind == "dpo":
        assert {"reward_acc", "reward_margin", "chosen_logp", "rejected_logp"} <= set([r for r in records if "loss" in r][-1])
        assert (tmp_path / "run" / "ref_logps").is_dir()
        assert "preference_accuracy" in evaluation["after"]
    else:
        after = evaluation["after"]  # one row per held-out identity question, each judged
        assert len(after["identity"]) == len(identity_eval()) > 0
        assert all(r["correct"] == identity_correct(r["reply"], r["key_fact"]) for r in after["identity"])
        assert after["identity_accuracy"] == sum(r["correct"] for r in after["identity"]) / len(after["identity"])
    final = list_checkpoints(tmp_path / "run")[-1]
    model, _ = load_checkpoint(final)  # a plain checkpoint with clean names, LoRA merged
    weights, state = load(final)
    assert not any("lora" in k for k in weights) and any(k.startswith("trainable.") for k in state) == lora
    # drop the last checkpoint, resume from step 3, and land on the same weights
    shutil.move(str(final), str(tmp_path / "saved"))
    result2, _ = run_posttrain(load_posttrain_config(kind, cfg_path), resume=True, progress=False, log=lambda *a: None)
    assert result2.step == 6
    again, _ = load(list_checkpoints(tmp_path / "run")[-1])
    for k, v in weights.items():
        assert torch.equal(again[k], v), k


def test_a_run_ended_by_its_time_limit_is_evaluated(tmp_path, init_ckpt):
    # train.max_minutes is a budget, not a failure: the evaluation after training is written
    cfg_path = write_config(tmp_path / "c.toml", "sft", init_ckpt, tmp_path / "run", train__max_minutes=1e-6)
    result, evaluation = run_posttrain(load_posttrain_config("sft", cfg_path), progress=False, log=lambda *a: None)
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result.stopped == saved["stopped"] == "time limit" and result.step == saved["steps"] == 1
    assert saved["after"] == evaluation["after"] and len(saved["after"]["identity"]) == len(identity_eval())


def cli(*args):
    """`chipshift ARGS` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


def test_cli_reports_a_bad_jsonl_line(tmp_path, init_ckpt):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}\n{"prompt": "Hi", "chosen": 3}\n')
    cfg = write_config(tmp_path / "c.toml", "dpo", init_ckpt, tmp_path / "run", dpo__data=str(data))
    code, err = cli("dpo", str(cfg))
    assert code == 2 and f"{data}:2" in err and err.count("\n") == 1
    code, err = cli("sft", str(cfg))
    assert code == 2 and "[dpo]" in err
    code, err = cli("dpo", str(cfg), "--set", "lora.rank=0", "--set", "lora.enabled=true")
    assert code == 2 and "lora.rank" in err
    code, err = cli("dpo", str(cfg), "--set", "run.parallel=fsdp")
    assert code == 2 and "run.parallel = 'fsdp'" in err and "'ddp'" in err


def test_refuses_an_init_whose_handoff_failed(tmp_path, tok_dir, model):
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer_dir=tok_dir)
    update_sidecar(ckpt, handoffs=[{"from": "cpu", "to": "npu", "time": "t", "verdict": "fail",
                                    "first_failing": {"logits": "layers.0"}, "report": "r.md"}])
    cfg = write_config(tmp_path / "c.toml", "sft", ckpt, tmp_path / "run")
    code, err = cli("sft", str(cfg))
    assert code == 2 and "handoff" in err and "--force" in err


def test_identity_conversations_are_the_sft_signal(tok):
    ex = encode_chat(tok, identity_conversations()[0])
    assert sum(ex.mask) > 0 and sum(ex.mask) < len(ex)
