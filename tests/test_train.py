"""The training loop: config validation, data layout, loss, precision, guards, checkpoints."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chipshift.cli import main as cli_main
from chipshift.devices import get_device
from chipshift.errors import ChipshiftError, ConfigError
from chipshift.model.config import preset
from chipshift.model.transformer import build_model
from chipshift.train import distributed, state
from chipshift.train.config import TrainConfig, from_dict, load_config
from chipshift.train.data import TokenWindows, rank_slice
from chipshift.train.loop import Trainer, train
from chipshift.train.objectives import (
    LanguageModeling,
    LossWorkspace,
    chunked_cross_entropy,
    reference_cross_entropy,
)
from chipshift.train.optim import MasterWeights, lr_at
from chipshift.train.precision import HalfMatmulUpcast


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: OpenMP's spinning threads only get in the way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def patterned_tokens(n_rows: int = 120, width: int = 48, vocab: int = 512) -> np.ndarray:
    """Rotations of one random row: learnable, so the loss must fall."""
    base = np.random.default_rng(0).integers(0, vocab, width)
    return np.concatenate([np.roll(base, k) for k in range(n_rows)]).astype(np.uint16)


def tiny_cfg(out, **sections) -> TrainConfig:
    raw = {"run": {"out": str(out), "dtype": "float32", "device": "cpu"}, "model": {"preset": "tiny"},
           "data": {"seq_len": 32, "batch_size": 4, "micro_batch": 2},
           "optim": {"warmup_steps": 2, "lr": 3e-3},
           "train": {"steps": 12, "log_every": 4, "eval_every": 6, "ckpt_every": 4, "eval_batches": 2}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


def streams(seed: int = 0):
    toks = patterned_tokens()
    return TokenWindows(toks, 32, seed), TokenWindows(toks, 32, shuffle=False)


# -- config ------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, words", [
    ({"optim": {"lrr": 1e-3}}, ["optim.lrr", "allowed", "lr"]),
    ({"optim": {"schedule": "linear"}}, ["optim.schedule", "'linear'", "cosine"]),
    ({"train": {"steps": -1}}, ["train.steps", "-1", "> 0"]),
    ({"data": {"seq_len": "long"}}, ["data.seq_len", "'long'", "int"]),
    ({"model": {"preset": "XXL"}}, ["model.preset", "XXL", "tiny"]),
    ({"model": {"hidden": 5}}, ["model.hidden", "allowed"]),
    ({"model": {"preset": "tiny", "num_kv_heads": 3}}, ["num_kv_heads"]),
    ({"optimizer": {}}, ["[optimizer]", "allowed"]),
    ({"run": {"parallel": "zero3"}}, ["run.parallel", "'zero3'", "ddp, fsdp"]),
    ({"run": {"compile": "yes"}}, ["run.compile", "'yes'", "auto, on, off"]),
    ({"run": {"collective_timeout_s": 0}}, ["run.collective_timeout_s", "0", "> 0"]),
    ({"run": {"collective_timeout_s": "1h"}}, ["run.collective_timeout_s", "'1h'", "float"]),
])
def test_config_errors_name_key_value_and_allowed(raw, words):
    with pytest.raises(ConfigError) as exc:
        from_dict(raw)
    for w in words:
        assert w in str(exc.value)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\npreset = "S"\n[optim]\nlr = 1e-3\n')
    cfg = load_config(path, ["optim.lr=5e-4", "run.out=somewhere", "run.compile=true"])
    assert cfg.optim.lr == 5e-4 and cfg.run.out == "somewhere" and cfg.run.compile == "on"
    assert cfg.model_config().hidden_size == 384
    assert cfg.model_config(vocab_size=1000).vocab_size == 8192  # the preset names its vocabulary
    assert from_dict({"model": {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 4,
                                "num_layers": 1, "intermediate_size": 96}}).model_config(300).vocab_size == 300
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["lr=1"])


def test_cli_config_typo_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nstepz = 3\n")
    assert cli_main(["pretrain", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- data --------------------------------------------------------------------------------
def test_windows_are_deterministic_and_split_by_rank_without_changing_the_stream():
    toks = np.arange(1000, dtype=np.uint16)
    a, b = TokenWindows(toks, 10, seed=3), TokenWindows(toks, 10, seed=3)
    whole = a.batch(5, 8)["input_ids"]
    assert torch.equal(whole, b.batch(5, 8)["input_ids"])
    parts = [a.batch(*rank_slice(5, 8, r, 2))["input_ids"] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)  # 2 processes read exactly the 1-process batch
    batch = a.batch(0, 3)
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    epoch = [a.window_start(i) for i in range(a.num_windows)]
    assert sorted(epoch) == [10 * i for i in range(a.num_windows)]  # each window once per epoch
    assert epoch != [a.window_start(a.num_windows + i) for i in range(a.num_windows)]  # reshuffled


# -- loss and precision ------------------------------------------------------------------
def test_chunked_cross_entropy_matches_full_logits():
    torch.manual_seed(0)
    model = build_model(preset("tiny"))
    ids = torch.randint(0, 512, (2, 17))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :4] = -100
    ref = reference_cross_entropy(model, x, y)
    ref.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = chunked_cross_entropy(model.forward_hidden(x), model.output_weight, y, chunk_rows=5)
    got.backward()
    assert abs(got.item() - ref.item()) <= 1e-5 * ref.item()
    for w, p in zip(want, model.parameters()):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: same value, no gradient buffers
        assert abs(chunked_cross_entropy(model.forward_hidden(x), model.output_weight, y).item() - ref.item()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [5, 1000])  # several chunks, one chunk
def test_chunked_cross_entropy_workspace_is_reused_and_never_handed_out(dtype, chunk_rows):
    """Loss and gradients with a kept workspace equal a fresh one's, call after call, and
    a gradient handed out is never a workspace buffer the next call overwrites."""
    torch.manual_seed(0)
    hidden = torch.randn(24, 64).to(dtype)
    weight = (torch.randn(512, 64) * 0.1).to(dtype)
    labels = torch.randint(0, 512, (24,))
    labels[:3] = -100

    def run(ws, scale=1.0):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = chunked_cross_entropy(h, w, labels * 1, chunk_rows, workspace=ws)
        (loss * scale).backward()
        return loss.detach(), h.grad, w.grad
    ws = LossWorkspace()
    first = run(ws)
    kept = [t.clone() for t in first]
    second = run(ws, scale=2.0)  # reuses the buffers
    for a, b in zip(first, kept):  # the first call's gradients were not overwritten
        assert torch.equal(a, b)
    fresh = run(None, scale=2.0)
    for a, b in zip(second, fresh):
        assert torch.equal(a, b)
    # against float32 logits: the half path's rounding only
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h @ w.T, labels, ignore_index=-100)
    ref.backward()
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(first[0].float(), ref.detach(), **tol)
    torch.testing.assert_close(first[1].float(), h.grad, **tol)
    torch.testing.assert_close(first[2].float(), w.grad, **tol)


def test_half_matmul_upcast_is_bf16_compute():
    """The fast path's outputs are torch's own bf16 GEMM results to within one bf16 rounding."""
    torch.manual_seed(0)
    x = torch.randn(64, 96, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(80, 96, dtype=torch.bfloat16, requires_grad=True)
    native = torch.nn.functional.linear(x, w)
    native.float().square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with HalfMatmulUpcast():
        fast = torch.nn.functional.linear(x, w)
        batched = torch.randn(2, 3, 5, 96, dtype=torch.bfloat16) @ w.T
    fast.float().square().sum().backward()
    assert fast.dtype == torch.bfloat16 and batched.dtype == torch.bfloat16
    for got, want in ((fast, native), (x.grad, gx), (w.grad, gw)):
        ulp = want.float().abs() * 2**-7 + 1e-6
        assert ((got.float() - want.float()).abs() <= ulp).all()


def test_lr_schedules():
    cfg = TrainConfig().optim
    cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio = 10, 1.0, 0.1
    assert lr_at(0, 100, cfg) == pytest.approx(0.1) and lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(99, 100, cfg) == pytest.approx(0.1, abs=1e-3)
    cfg.schedule, cfg.decay_fraction = "wsd", 0.2
    assert lr_at(79, 100, cfg) == 1.0 and lr_at(99, 100, cfg) == pytest.approx(0.1)
    assert lr_at(89, 100, cfg) == pytest.approx(0.55)


# -- the loop ----------------------------------------------------------------------------
def test_loop_learns_logs_and_checkpoints(tmp_path):
    train_s, val_s = streams()
    result = train(tiny_cfg(tmp_path), LanguageModeling(), train_s, val_s, progress=False, log=lambda *a: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0] - 1.0
    assert all("tokens_per_s" in r and "mfu" in r for r in records if "loss" in r)
    assert result.png.exists() and (tmp_path / "config.resolved.json").exists()
    assert [p.name for p in state.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000008", "step_00000012"]
    assert result.checkpoint.name == "step_00000012"
    assert list((tmp_path / "tensorboard").iterdir())


def test_resume_in_process_is_bit_identical(tmp_path):
    quiet = dict(progress=False, log=lambda *a: None)
    full = train(tiny_cfg(tmp_path / "a"), None, *streams(), **quiet)
    train(tiny_cfg(tmp_path / "b", train={"steps": 12}), None, *streams(), **quiet)
    # throw away the last two checkpoints, as if the run had died after step 4
    for p in state.list_checkpoints(tmp_path / "b")[1:]:
        import shutil
        shutil.rmtree(p)
    resumed = train(tiny_cfg(tmp_path / "b"), None, *streams(), resume=True, **quiet)
    wa, _ = state.load(full.checkpoint)
    wb, tb = state.load(resumed.checkpoint)
    _, ta = state.load(full.checkpoint)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_damaged_newest_checkpoint_is_skipped(tmp_path):
    train(tiny_cfg(tmp_path), None, *streams(), progress=False, log=lambda *a: None)
    newest = state.list_checkpoints(tmp_path)[-1]
    with open(newest / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, _ = state.latest_valid(tmp_path)
    assert path.name == "step_00000008" and "sha256" in str(caught[0].message)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ChipshiftError, match="no valid checkpoint"):
        train(tiny_cfg(tmp_path), None, *streams(), resume=True, progress=False, log=lambda *a: None)


class NaNAfter:
    """The LM objective, poisoned from a given step on (counted in calls)."""

    name = "lm"

    def __init__(self, good_calls: int) -> None:
        self.calls, self.good_calls, self.inner = 0, good_calls, LanguageModeling()

    def __call__(self, model, batch):
        self.calls += 1
        loss, m = self.inner(model, batch)
        return (loss * float("nan") if self.calls > self.good_calls and model.training else loss), m


def test_non_finite_steps_are_skipped_then_stop_with_checkpoint_intact(tmp_path):
    cfg = tiny_cfg(tmp_path, train={"max_bad_steps": 3, "eval_every": 0})
    # 2 micro-batches per step: steps 1-5 are good, every later step is poisoned
    with pytest.raises(ChipshiftError, match=r"3 steps in a row.*step_00000004"):
        train(cfg, NaNAfter(10), *streams(), progress=False, log=lambda *a: None)
    path, side = state.latest_valid(tmp_path)
    assert path.name == "step_00000004"
    weights, _ = state.load(path)
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("run, train_section, words", [
    ({"dtype": "float16"}, {}, ["run.parallel = 'fsdp'", "float16", "bfloat16"]),
    ({}, {"eval_batches": 3}, ["train.eval_batches = 3", "multiple of the 2 processes"]),
])
def test_fsdp_settings_it_cannot_run_are_refused_before_work(tmp_path, run, train_section, words):
    cfg = tiny_cfg(tmp_path, run={"parallel": "fsdp", **run}, train=train_section)
    with pytest.raises(ConfigError) as exc:  # raised before any collective: no process group needed
        Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(),
                world=distributed.World(0, 2), log=lambda *a: None)
    for w in words:
        assert w in str(exc.value)


def test_accelerator_rng_state_is_saved_and_restored(tmp_path):
    """`rng.device` holds the accelerator generator (faked here on a CPU device) and comes
    back on resume, unless the checkpoint was written on another device type."""
    cfg = tiny_cfg(tmp_path)
    generator_state = torch.arange(16, dtype=torch.uint8)
    dev = get_device("cpu")
    dev.get_rng_state = lambda: generator_state.clone()
    trainer = Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), device=dev,
                      log=lambda *a: None)
    trainer.train_step()
    path = trainer.save(tmp_path)
    assert torch.equal(state.load(path)[1]["rng.device"], generator_state)
    assert "rng.device" not in Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(),
                                       log=lambda *a: None).state_tensors()  # a real CPU has none

    _, sidecar = state.latest_valid(tmp_path)
    for written_on, restored in (("cpu", [generator_state]), ("npu:0", [])):
        dev, calls, messages = get_device("cpu"), [], []
        dev.set_rng_state = calls.append
        resumed = Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), device=dev,
                          log=messages.append)
        resumed.restore(path, {**sidecar, "device": written_on})
        assert len(calls) == len(restored) and all(torch.equal(a, b) for a, b in zip(calls, restored))
        assert resumed.step == 1 and (written_on == "cpu" or "written on npu" in messages[-1])


def test_batch_that_cannot_fit_is_refused_before_work(tmp_path):
    cfg = tiny_cfg(tmp_path, model={"preset": "llama-3.2-1b"}, data={"micro_batch": 4096, "batch_size": 4096,
                                                                      "seq_len": 4096})
    with pytest.raises(ChipshiftError, match="cannot fit.*micro_batch"):
        Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), log=lambda *a: None)


def test_bf16_master_step_runs_and_keeps_fp32_master(tmp_path):
    cfg = tiny_cfg(tmp_path, run={"dtype": "bfloat16", "half_matmul_upcast": "on"})
    trainer = Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), log=lambda *a: None)
    first = trainer.train_step()
    for _ in range(3):
        last = trainer.train_step()
    assert trainer.precision == "master" and trainer.upcast
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert all(w.dtype == torch.float32 for w in trainer.weights().values())
    assert math.isfinite(last.loss) and last.loss < first.loss


def test_master_grads_take_each_half_grad_exactly_and_drop_it():
    """The float32 gradients equal the half ones; a parameter without a gradient gets zeros;
    the half gradients are gone, so the step's peak never holds both sets whole."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    master = MasterWeights(model)
    model(torch.randn(3, 8, dtype=torch.bfloat16)).float().square().sum().backward()
    model[1].bias.grad = None  # as an unused parameter leaves it
    halves = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    master.to_master_grads()
    for name, m in master.named_parameters():
        assert m.grad.dtype == torch.float32
        assert torch.equal(m.grad, halves[name].float()) if name in halves else not m.grad.any()
    assert all(p.grad is None for p in model.parameters())


class WithMetric:
    """A plug-in objective: the LM loss plus a metric the loop must average and log."""

    name = "lm+metric"

    def __init__(self) -> None:
        self.inner = LanguageModeling()

    def __call__(self, model, batch):
        loss, _ = self.inner(model, batch)
        return loss, {"half": torch.tensor(0.5)}


def test_objective_metrics_are_logged_and_time_limit_ends_cleanly(tmp_path):
    cfg = tiny_cfg(tmp_path, train={"max_minutes": 1e-6, "log_every": 1})
    result = train(cfg, WithMetric(), *streams(), progress=False, log=lambda *a: None)
    assert result.stopped == "time limit" and result.step == 1
    assert result.checkpoint.name == "step_00000001" and result.png.exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("half") == 0.5 for r in records) and any(r.get("val_half") == 0.5 for r in records)
    assert state.latest_valid(tmp_path)[1]["meta"]["objective"] == "lm+metric"


@pytest.mark.slow  # inductor compiles forward and backward: about 40 s on one thread, cache cold
def test_compiled_pretrain_matches_eager(tmp_path):
    runs = {}
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "eager")
        cfg = tiny_cfg(out, run={"compile": compiled},
                       train={"steps": 4, "log_every": 1, "eval_every": 2, "ckpt_every": 4})
        result = train(cfg, None, *streams(), progress=False, log=lambda *a: None)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[compiled] = ([r.get("loss", r.get("val_loss")) for r in records], state.load(result.checkpoint)[0])
    (eager, w_eager), (compiled, w_compiled) = runs[False], runs[True]
    assert len(eager) == len(compiled) == 4 + 3  # 4 steps, validation at steps 0, 2, 4
    worst = max(abs(c - e) / abs(e) for e, c in zip(eager, compiled))
    assert worst <= 1e-4, f"compiled vs eager: relative loss difference {worst:.2e}"
    assert w_compiled.keys() == w_eager.keys()  # no `_orig_mod.` from the compiled forward
    # AdamW moves a weight by up to lr (3e-3) a step whatever its gradient's size, so where a
    # gradient is near zero, float32 rounding that differs between inductor's fused kernels
    # and eager (by CPU class: AVX512 and AVX2 fuse differently) moves that weight by a small
    # fraction of lr: measured up to 1.5e-5 on an AVX512-BF16 CPU. 1e-4 is 3% of one step.
    for k in w_eager:
        torch.testing.assert_close(w_compiled[k], w_eager[k], rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_gives_the_same_step(tmp_path):
    results = []
    for ckpt in (False, True):
        cfg = tiny_cfg(tmp_path / str(ckpt), run={"activation_checkpointing": ckpt})
        trainer = Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), log=lambda *a: None)
        results.append((trainer.train_step().loss, trainer.weights()))
    (loss_a, wa), (loss_b, wb) = results
    assert loss_a == loss_b
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_float16_uses_autocast_with_loss_scaling(tmp_path):
    cfg = tiny_cfg(tmp_path, run={"dtype": "float16"})
    trainer = Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), log=lambda *a: None)
    stats = [trainer.train_step() for _ in range(3)]
    assert trainer.precision == "autocast" and trainer.scaler is not None
    assert next(trainer.model.parameters()).dtype == torch.float32
    assert all(math.isfinite(s.loss) for s in stats) and "scale" in trainer.meta()["scaler"]


def test_upcast_and_activation_checkpointing_are_exclusive(tmp_path):
    cfg = tiny_cfg(tmp_path, run={"dtype": "bfloat16", "half_matmul_upcast": "on", "activation_checkpointing": True})
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), log=lambda *a: None)
    cfg = tiny_cfg(tmp_path, run={"dtype": "bfloat16", "activation_checkpointing": True})
    trainer = Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), log=lambda *a: None)
    assert not trainer.upcast and math.isfinite(trainer.train_step().loss)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_upcast_attention_matches_native_bf16_sdpa(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, kv_heads, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, kv_heads, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    outs, grads = [], []
    for mode in (None, HalfMatmulUpcast()):
        with mode or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = sdpa(q, k, v, is_causal=True, enable_gqa=kv_heads != 4)
        out.float().square().sum().backward()
        outs.append(out)
        grads.append([t.grad.clone() for t in (q, k, v)])
        q.grad = k.grad = v.grad = None
    assert outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(b.float(), a.float(), rtol=5e-2, atol=5e-2)


# -- float32 GEMMs through oneDNN (devices.kernels.onednn) --------------------------------------
def test_onednn_linear_matches_torch_forward_and_backward():
    from chipshift.devices.kernels import onednn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 48, generator=g, requires_grad=True)
    w = torch.randn(40, 48, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    dy = torch.randn(3, 70, 40, generator=g)
    grads = []
    for fn in (onednn.linear, F.linear):
        y = fn(x, w, b)
        grads.append((y, *torch.autograd.grad(y, (x, w, b), dy)))
    for ours, plain in zip(*grads):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    assert onednn.linear(x.bfloat16(), w.bfloat16()) is None  # not float32: the caller's plain path


def test_trainer_float32_gemms_through_onednn_or_torch_train_alike(tmp_path, monkeypatch):
    """Pinned either way, a float32 run's losses agree; under oneDNN every plain linear and the
    loss head go through it, a LoRA layer keeps its own forward, and the log says which."""
    from chipshift.devices.kernels import onednn
    from chipshift.model.lora import LoRALinear

    losses, trainers = {}, {}
    for choice in ("torch", "onednn"):
        monkeypatch.setenv("CHIPSHIFT_FP32_GEMM", choice)
        cfg, lines = tiny_cfg(tmp_path / choice), []
        trainer = Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), log=lines.append)
        losses[choice] = [trainer.train_step().loss for _ in range(4)]
        trainers[choice] = trainer
        assert trainer.fp32_gemm == choice and any(line.startswith("float32 GEMMs: ") for line in lines)
    assert losses["torch"] == pytest.approx(losses["onednn"], rel=1e-5)
    model = trainers["onednn"].model
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(m.forward.args[0] is onednn.linear for m in linears)
    assert model.head_gemms == (onednn.mm_nt, onednn.mm_nn)
    assert trainers["torch"].model.head_gemms is None
    assert not any("forward" in m.__dict__ for m in trainers["torch"].model.modules())
    lora = LoRALinear(torch.nn.Linear(8, 8), rank=2, alpha=4, dropout=0.0)
    model.layers[0].mlp.down_proj = lora
    model.use_linear_kernel(onednn.linear)
    assert "forward" not in lora.__dict__


def test_bfloat16_run_keeps_torch_gemms(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIPSHIFT_FP32_GEMM", "onednn")
    cfg = tiny_cfg(tmp_path, run={"dtype": "bfloat16"})
    trainer = Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), log=lambda *a: None)
    assert trainer.fp32_gemm == "torch" and getattr(trainer.model, "head_gemms", None) is None


def test_resumed_run_keeps_the_float32_gemms_it_began_with(tmp_path, monkeypatch):
    """A resumed process whose probe decides otherwise keeps the checkpoint's GEMMs, so the run
    resumes exactly; a pinned run.fp32_gemm wins over the checkpoint."""
    monkeypatch.setenv("CHIPSHIFT_FP32_GEMM", "onednn")
    cfg = tiny_cfg(tmp_path)
    first = Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), log=lambda *a: None)
    first.train_step()
    path = first.save(tmp_path)
    _, sidecar = state.latest_valid(tmp_path)
    assert sidecar["meta"]["fp32_gemm"] == "onednn"
    monkeypatch.setenv("CHIPSHIFT_FP32_GEMM", "torch")
    lines = []
    resumed = Trainer(cfg, LanguageModeling(), streams()[0], model_cfg=cfg.model_config(), log=lines.append)
    assert resumed.fp32_gemm == "torch"
    resumed.restore(path, sidecar)
    assert resumed.fp32_gemm == "onednn" and resumed.model.head_gemms is not None
    assert any("as the run began" in line for line in lines)
    pinned = tiny_cfg(tmp_path, run={"fp32_gemm": "torch"})
    kept = Trainer(pinned, LanguageModeling(), streams()[0], model_cfg=pinned.model_config(), log=lambda *a: None)
    kept.restore(path, sidecar)
    assert kept.fp32_gemm == "torch"


def test_fp32_gemm_setting_names_its_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match="run.fp32_gemm.*auto.*onednn.*torch"):
        tiny_cfg(tmp_path, run={"fp32_gemm": "mkl"})
