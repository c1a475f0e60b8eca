"""What a training run will cost on a fleet: FLOPs, time, chip-hours, memory, money, energy.

Every figure is a `Figure` that carries its source, one of:

    given                  typed by the user (or read from a preset / checkpoint sidecar)
    datasheet (official)   the chip catalogue, from a vendor datasheet
    datasheet (estimate)   the chip catalogue, from press, papers or a sibling part
    measured               a `chipshift bench` JSON
    assumed                a default the user can override (the flag is named)
    derived                computed from the above; the formula is named
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chipshift.devices import get_chip, load_catalogue
from chipshift.errors import ChipshiftError
from chipshift.model import flops, memory
from chipshift.model.checkpoint import read_sidecar
from chipshift.model.config import PRESETS, ModelConfig, preset

DEFAULT_MFU = 0.40
DEFAULT_VOCAB = 32000
DEFAULT_SEQ_LEN = 4096
DEFAULT_USABLE = 0.90
DEFAULT_DAYS = 30
# an aspect ratio of hidden = 128 * layers matches Llama 2 7B/13B and Llama 3 8B
HIDDEN_PER_LAYER = 128
MAX_PARAMS = 1e14  # 100T parameters: beyond any model trained so far by ~50x
MAX_TOKENS = 1e16
# failures: Llama 3's pre-training saw 419 unexpected interruptions in 54 days on 16,384 H100
# (Llama 3 paper, section 3.3.4), 0.47 per 1000 GPU-days
DEFAULT_FAILURE_RATE = 419 / (54 * 16384) * 1000
DEFAULT_CHIPS_PER_NODE = 8  # HGX/DGX H100, Atlas 800T A2 (910B), MI300X platform servers
DEFAULT_CHECKPOINT_GBPS = 2.0  # one writer (global rank 0) to shared storage
DEFAULT_RESTART_MINUTES = 5.0  # notice the failure, re-rendezvous, start the workers, build the model
CHECKPOINT_BYTES_PER_PARAM = 12  # chipshift's training checkpoint: fp32 weights + two fp32 AdamW moments


@dataclass
class Figure:
    value: float | int | str | None
    unit: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def _check_range(name: str, value: float | None, lo: float, hi: float) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < lo or value > hi:
        raise ChipshiftError(f"{name} = {value:g}: must be between {lo:g} and {hi:g}")


# -- the model ---------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """The model a plan is for: a shape, its parameter count, and where each came from."""

    label: str
    cfg: ModelConfig
    n_params: Figure  # all parameters
    n_matmul: Figure  # parameters doing a matmul per token (see flops.py)
    seq_len: Figure
    shape_source: str  # where layers/hidden/heads/vocab came from
    notes: list[str] = field(default_factory=list)


def _heads_for(hidden: int) -> int:
    for head_dim in (128, 64, 96, 80, 32, 16, 8, 4, 2):
        if hidden % head_dim == 0:
            return hidden // head_dim
    raise ChipshiftError(f"--hidden = {hidden}: must be even (rotary embeddings need an even head size)")


def _shape(layers: int, hidden: int, vocab: int, seq_len: int) -> ModelConfig:
    heads = _heads_for(hidden)
    intermediate = 256 * math.ceil(8 * hidden / 3 / 256)  # SwiGLU at ~8/3 h, as Llama
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads, intermediate_size=intermediate, max_seq_len=seq_len,
                       tie_embeddings=False)


def _approx_params(layers: int, hidden: int, vocab: int) -> float:
    return 12 * layers * hidden**2 + 2 * vocab * hidden


def resolve_model(model: str | None = None, *, params: float | None = None, layers: int | None = None,
                  hidden: int | None = None, vocab: int | None = None,
                  seq_len: int | None = None) -> ModelSpec:
    """A preset name or checkpoint directory, or a size from which a Llama-like shape is
    derived (each derived or assumed field says so in `notes`)."""
    _check_range("--params", params, 1e3, MAX_PARAMS)
    _check_range("--layers", layers, 1, 10_000)
    _check_range("--hidden", hidden, 2, 1_000_000)
    _check_range("--vocab", vocab, 2, 10_000_000)
    _check_range("--seq-len", seq_len, 1, 10_000_000)
    notes: list[str] = []
    if model is not None:
        if any(x is not None for x in (params, layers, hidden, vocab)):
            raise ChipshiftError("give either --model or a size (--params/--layers/--hidden/--vocab), not both")
        if model in PRESETS:
            cfg, origin = preset(model), f"given: preset {model}"
        elif Path(model).is_dir():
            cfg = ModelConfig.from_dict(read_sidecar(model)["model_config"])
            origin = f"given: checkpoint {model} (chipshift.json)"
        else:
            raise ChipshiftError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) "
                                 f"nor a checkpoint directory")
        if seq_len is None:
            seq = Figure(min(cfg.max_seq_len, DEFAULT_SEQ_LEN), "tokens",
                         f"assumed: the model's max_seq_len capped at {DEFAULT_SEQ_LEN} (set --seq-len)")
        else:
            seq = Figure(seq_len, "tokens", "given")
        n = cfg.num_params()
        return ModelSpec(model, cfg, Figure(n, "", origin), Figure(flops.matmul_params(cfg), "", "derived: "
                         "all parameters except an untied input-embedding table"), seq, origin, notes)

    if params is None and (layers is None or hidden is None):
        raise ChipshiftError("describe the model: --model PRESET|CKPT, or --params N, "
                             "or both --layers and --hidden")
    seq = Figure(seq_len or DEFAULT_SEQ_LEN, "tokens", "given" if seq_len else
                 f"assumed: {DEFAULT_SEQ_LEN}, typical of 1B-70B pre-training (set --seq-len)")
    if vocab is None:
        vocab = DEFAULT_VOCAB
        notes.append(f"vocab {DEFAULT_VOCAB} assumed (set --vocab)")
    if layers is None and hidden is None:
        layers = min(range(1, 513), key=lambda L: abs(_approx_params(L, HIDDEN_PER_LAYER * L, vocab) - params))
        hidden = HIDDEN_PER_LAYER * layers
        notes.append(f"layers {layers} and hidden {hidden} derived from {params:.3g} parameters "
                     f"(hidden = {HIDDEN_PER_LAYER} x layers, as Llama 2/3 7-13B)")
    elif layers is None:
        layers = max(1, round((params - 2 * vocab * hidden) / (12 * hidden**2)))
        notes.append(f"layers {layers} derived from {params:.3g} parameters and hidden {hidden}")
    elif hidden is None:
        # 12 L h^2 + 2 V h = N, solved for h and rounded to a multiple of 64
        root = (-2 * vocab + math.sqrt(4 * vocab**2 + 48 * layers * params)) / (24 * layers)
        hidden = max(64, 64 * round(root / 64))
        notes.append(f"hidden {hidden} derived from {params:.3g} parameters and {layers} layers")
    cfg = _shape(int(layers), int(hidden), int(vocab), int(seq.value))
    notes.append(f"heads {cfg.num_heads} x {cfg.head_dim}, SwiGLU {cfg.intermediate_size}, "
                 f"untied embeddings assumed")
    if params is None:
        n_params = Figure(cfg.num_params(), "", "derived: parameter count of the Llama-like shape")
        n_matmul = Figure(flops.matmul_params(cfg), "", "derived: all parameters except the input embedding")
    else:
        n_params = Figure(params, "", "given")
        n_matmul = Figure(params, "", "given: the parameter count, as in published 6ND figures")
        shape_n = cfg.num_params()
        if abs(shape_n - params) > 0.25 * params:
            notes.append(f"the shape holds {shape_n:.3g} parameters, {shape_n / params:.2f}x the "
                         f"{params:.3g} given; FLOPs and states use the given count")
    mantissa, _, exp = f"{float(n_params.value):.3g}".partition("e")
    label = f"{mantissa}e{int(exp) if exp else 0}-parameter model"
    return ModelSpec(label, cfg, n_params, n_matmul, seq, "derived: see notes", notes)


# -- the chip ----------------------------------------------------------------------------

@dataclass
class ChipSpec:
    key: str
    name: str
    peak_flops: Figure  # FLOP/s in the training dtype
    mfu: Figure
    memory_bytes: Figure
    power_w: Figure | None
    precision: str  # key of memory.PRECISIONS


def resolve_chip_key(name: str) -> str:
    """A catalogue key, or an unambiguous prefix of one (`h100` -> `h100-sxm`)."""
    chips = load_catalogue()
    if name in chips:
        return name
    matches = [k for k in chips if k.startswith(name + "-")]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ChipshiftError(f"chip {name!r} is ambiguous: {', '.join(matches)}")
    return get_chip(name).key  # raises, listing the known chips


def _datasheet(chip) -> str:
    return f"datasheet ({chip.status}): {chip.source}"


def chip_from_catalogue(name: str, mfu: float | None = None) -> ChipSpec:
    chip = get_chip(resolve_chip_key(name))
    src = _datasheet(chip)
    return ChipSpec(
        key=chip.key, name=chip.name,
        peak_flops=Figure(chip.peak_flops("bfloat16"), "FLOP/s", src + " (bf16 dense)"),
        mfu=Figure(mfu, "", "given") if mfu is not None else Figure(
            DEFAULT_MFU, "", f"assumed: {DEFAULT_MFU} for a tuned large dense run (set --mfu, "
                             f"or pass a bench JSON as --chip)"),
        memory_bytes=Figure(chip.memory_gb * 1e9, "bytes", src),
        power_w=Figure(chip.power_w, "W", src),
        precision="bf16-mixed",
    )


def chip_from_bench(path: str | Path, mfu: float | None = None) -> ChipSpec:
    """A chip as measured by `chipshift bench` (its best training batch size)."""
    path = Path(path)
    try:
        bench = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ChipshiftError(f"cannot read bench result {path}: {exc}") from None
    if bench.get("format") != "chipshift-bench":
        raise ChipshiftError(f"{path} is not a `chipshift bench` result")
    best = bench["train"]["best"]
    if best is None:
        raise ChipshiftError(f"{path} has no training measurement")
    dev = bench["device"]
    measured = f"measured: {path.name}, {bench['settings']['model']} at batch {best['batch']}"
    catalogue = bench.get("catalogue")
    chip = get_chip(catalogue["key"]) if catalogue else None
    dtype = bench["train"]["dtype"]
    if chip is not None and best["peak_source"].startswith("catalogue"):
        peak = Figure(best["peak_flops"], "FLOP/s", f"{_datasheet(chip)} ({dtype} dense)")
    else:
        peak = Figure(best["peak_flops"], "FLOP/s", f"measured: {path.name}, {dtype} matmul ceiling")
    return ChipSpec(
        key=f"{dev['type']}:{path.stem}", name=f"{dev['name']} ({path.name})",
        peak_flops=peak,
        mfu=Figure(mfu, "", "given") if mfu is not None else Figure(best["mfu"], "", measured + " (a "
                   "different model size or parallel setup will reach a different MFU)"),
        memory_bytes=Figure(dev["memory_bytes"], "bytes", f"measured: {path.name}, device total memory"),
        power_w=Figure(chip.power_w, "W", _datasheet(chip)) if chip else None,
        precision="fp32" if bench["train"]["dtype"] == "float32" else "bf16-mixed",
    )


def resolve_chip(name: str, mfu: float | None = None) -> ChipSpec:
    _check_range("--mfu", mfu, 1e-4, 1.0)
    if name.endswith(".json") or Path(name).is_file():
        return chip_from_bench(name, mfu)
    return chip_from_catalogue(name, mfu)


# -- the plan ----------------------------------------------------------------------------

@dataclass
class Plan:
    model: ModelSpec
    chip: ChipSpec
    tokens: float
    count: Figure
    figures: dict[str, Figure]
    memory_rows: list[tuple[memory.MemoryPerChip, int | None]]  # with the smallest count that fits
    usable_bytes: Figure
    fits: str | None  # the first strategy that fits at `count`, or None
    shortfall_bytes: float  # how much the leanest strategy misses by at `count` (0 when it fits)
    micro_batch: Figure

    def to_dict(self) -> dict:
        return {
            "model": {"label": self.model.label, "config": self.model.cfg.to_dict(),
                      "n_params": self.model.n_params.to_dict(), "n_matmul": self.model.n_matmul.to_dict(),
                      "seq_len": self.model.seq_len.to_dict(), "notes": self.model.notes},
            "chip": {"key": self.chip.key, "name": self.chip.name, "precision": self.chip.precision},
            "tokens": self.tokens,
            "count": self.count.to_dict(),
            "micro_batch": self.micro_batch.to_dict(),
            "figures": {k: v.to_dict() for k, v in self.figures.items()},
            "memory_per_chip": [
                {"strategy": m.label, "params": m.params, "grads": m.grads, "optimizer": m.optimizer,
                 "gathered": m.gathered, "activations": m.activations, "master_step": m.master_step,
                 "total": m.total,
                 "fits": m.total <= self.usable_bytes.value, "smallest_count": n}
                for m, n in self.memory_rows],
            "usable_bytes_per_chip": self.usable_bytes.to_dict(),
            "fits": self.fits,
            "shortfall_bytes": self.shortfall_bytes,
        }


def make_plan(model: ModelSpec, tokens: float, chip: ChipSpec, *, count: int | None = None,
              days: float | None = None, micro_batch: int | None = None, usable: float | None = None,
              price_per_hour: float | None = None, power_w: float | None = None,
              attention: str = "flash", chips_per_node: int | None = None, failure_rate: float | None = None,
              checkpoint_gbps: float | None = None, restart_minutes: float | None = None) -> Plan:
    _check_range("--tokens", tokens, 1, MAX_TOKENS)
    _check_range("--count", count, 1, 1 << 20)
    _check_range("--days", days, 1e-3, 1e5)
    _check_range("--micro-batch", micro_batch, 1, 1 << 16)
    _check_range("--usable-memory", usable, 0.05, 1.0)
    _check_range("--price-per-hour", price_per_hour, 0, 1e6)
    _check_range("--power-w", power_w, 1, 1e5)
    _check_range("--chips-per-node", chips_per_node, 1, 1024)
    _check_range("--failure-rate", failure_rate, 0, 1e4)
    _check_range("--checkpoint-gbps", checkpoint_gbps, 1e-3, 1e5)
    _check_range("--restart-minutes", restart_minutes, 0, 1e4)
    cfg, seq = model.cfg, int(model.seq_len.value)
    n, n_mm = float(model.n_params.value), float(model.n_matmul.value)
    prec = memory.PRECISIONS[chip.precision]
    mb = Figure(micro_batch or 1, "sequences", "given" if micro_batch else
                "assumed: 1 sequence per chip per micro-batch (set --micro-batch)")
    usable_frac = Figure(usable or DEFAULT_USABLE, "", "given" if usable else
                         f"assumed: {DEFAULT_USABLE:.0%} of device memory usable by tensors "
                         f"(runtime, allocator); set --usable-memory")
    usable_bytes = Figure(chip.memory_bytes.value * usable_frac.value, "bytes",
                          f"derived: {chip.memory_bytes.source.split(':')[0]} memory x {usable_frac.value:g}")

    f: dict[str, Figure] = {}
    f["parameters"] = model.n_params
    f["seq_len"] = model.seq_len
    f["tokens"] = Figure(tokens, "tokens", "given")
    per_token = flops.flops_per_token(n_mm, cfg.num_layers, flops.attention_dim(cfg), seq)
    f["flops_per_token"] = Figure(per_token, "FLOP", "derived: 6N + 12*L*A*S (PaLM appendix B), "
                                  f"N={n_mm:.3g}, L={cfg.num_layers}, A={flops.attention_dim(cfg)}, S={seq}")
    dense, attn = flops.training_flops(n_mm, cfg.num_layers, flops.attention_dim(cfg), seq, tokens)
    f["flops_dense"] = Figure(dense, "FLOP", "derived: 6*N*D")
    f["flops_attention"] = Figure(attn, "FLOP", "derived: 12*L*A*S*D")
    total = dense + attn
    f["flops_total"] = Figure(total, "FLOP", "derived: 6ND + attention")
    f["peak_flops"] = chip.peak_flops
    f["mfu"] = chip.mfu
    achieved = chip.peak_flops.value * chip.mfu.value
    f["achieved_flops"] = Figure(achieved, "FLOP/s", "derived: peak x MFU")
    chip_seconds = total / achieved
    f["chip_hours"] = Figure(chip_seconds / 3600, "chip-hours", "derived: FLOPs / (peak x MFU)")

    rows_at = lambda c: memory.all_strategies(n, cfg, c, prec, int(mb.value), seq, attention)  # noqa: E731
    smallest = {(s, ck): memory.smallest_count(n, cfg, usable_bytes.value, s, ck, prec, int(mb.value), seq, attention)
                for s in memory.STRATEGIES for ck in (False, True)}
    leanest = smallest[("fsdp", True)]
    if count is not None:
        n_chips = Figure(int(count), "chips", "given")
    elif leanest is None:
        n_chips = Figure(1, "chips", "derived: no chip count fits (see memory); shown for 1 chip")
    else:
        target = days or DEFAULT_DAYS
        kind = "given" if days else "assumed"
        need = math.ceil(chip_seconds / (target * 86400))
        n_chips = Figure(max(need, leanest), "chips", f"{kind}: a {target:g}-day run{'' if days else ' (set --days or --count)'}"
                         f": chips = ceil(chip-hours / (24 x days)), or the smallest count that fits if larger")
    c = int(n_chips.value)
    f["chips"] = n_chips
    f["wall_days"] = Figure(chip_seconds / c / 86400, "days", "derived: chip-hours / chips "
                            "(perfect scaling at the MFU above)")
    watts = Figure(power_w, "W", "given") if power_w else chip.power_w
    if watts is not None:
        f["power_w"] = watts
        f["energy_mwh"] = Figure(chip_seconds / 3600 * watts.value / 1e6, "MWh",
                                 "derived: chip-hours x board power (chips only: no host, network or cooling)")
    if price_per_hour is not None:
        f["price_per_chip_hour"] = Figure(price_per_hour, "$/chip-hour", "given")
        f["cost"] = Figure(chip_seconds / 3600 * price_per_hour, "$", "derived: chip-hours x price")

    f.update(failure_figures(n, c, f["wall_days"].value, tokens, chips_per_node, failure_rate, checkpoint_gbps,
                             restart_minutes))

    mem_rows = [(m, smallest[(key, m.checkpointing)]) for m, key in
                zip(rows_at(c), [s for s in memory.STRATEGIES for _ in (False, True)])]
    fitting = [m for m, _ in mem_rows if m.total <= usable_bytes.value]
    fits = fitting[0].label if fitting else None
    shortfall = 0.0 if fitting else min(m.total for m, _ in mem_rows) - usable_bytes.value
    return Plan(model, chip, tokens, n_chips, f, mem_rows, usable_bytes, fits, shortfall, mb)


def _given_or(value: float | None, default: float, unit: str, assumption: str) -> Figure:
    return Figure(value, unit, "given") if value is not None else Figure(default, unit, f"assumed: {assumption}")


def poisson_quantile(mean: float, p: float = 0.99) -> int:
    """The smallest k with P(N <= k) >= p for N ~ Poisson(mean)."""
    k, term = 0, math.exp(-mean) if mean < 700 else 0.0
    if term == 0.0:  # too many failures for the sum: the normal approximation
        return math.ceil(mean + 2.33 * math.sqrt(mean))
    total = term
    while total < p:
        k += 1
        term *= mean / k
        total += term
    return k


def failure_figures(n_params: float, chips: int, wall_days: float, tokens: float, chips_per_node: int | None,
                    failure_rate: float | None, checkpoint_gbps: float | None,
                    restart_minutes: float | None) -> dict[str, Figure]:
    """Nodes, failures and checkpoints for a run of `wall_days` on `chips`: how many nodes
    (torchrun agents), how often the job fails, how often to checkpoint (Young's interval)
    and the time lost to writing checkpoints and to restarts (first order: failures that
    the lost time itself brings are not counted)."""
    f = {}
    per_node = _given_or(chips_per_node, DEFAULT_CHIPS_PER_NODE, "chips",
                         f"{DEFAULT_CHIPS_PER_NODE} per server, as HGX H100 or Atlas 800T (set --chips-per-node)")
    f["chips_per_node"] = per_node
    f["nodes"] = Figure(math.ceil(chips / per_node.value), "nodes",
                        "derived: ceil(chips / chips per node), one torchrun agent each")
    rate = _given_or(failure_rate, DEFAULT_FAILURE_RATE, "per 1000 chip-days",
                     "Llama 3's 419 unexpected interruptions in 54 days on 16,384 H100 (Llama 3 paper, "
                     "section 3.3.4); other chips and sites differ (set --failure-rate)")
    f["failure_rate"] = rate
    mtbf_h = math.inf if rate.value == 0 else 24_000 / (rate.value * chips)
    f["job_mtbf_hours"] = Figure(mtbf_h, "hours", "derived: 24,000 / (failure rate x chips): any chip's "
                                                  "failure stops the whole job")
    wall_h = wall_days * 24
    failures = wall_h / mtbf_h
    f["expected_failures"] = Figure(failures, "failures", "derived: wall-clock hours / job MTBF")
    f["max_restarts"] = Figure(poisson_quantile(failures), "restarts",
                               "derived: 99th percentile of a Poisson count with that mean (torchrun --max-restarts)")
    size = n_params * CHECKPOINT_BYTES_PER_PARAM
    f["checkpoint_bytes"] = Figure(size, "bytes", f"derived: {CHECKPOINT_BYTES_PER_PARAM} bytes per parameter "
                                                  f"(fp32 weights and two fp32 AdamW moments, whole tensors)")
    bw = _given_or(checkpoint_gbps, DEFAULT_CHECKPOINT_GBPS, "GB/s",
                   f"{DEFAULT_CHECKPOINT_GBPS:g} GB/s from the one writer (global rank 0) to shared storage, "
                   f"and back when resuming (set --checkpoint-gbps)")
    f["checkpoint_gbps"] = bw
    write_s = size / (bw.value * 1e9)
    f["checkpoint_write_s"] = Figure(write_s, "s", "derived: checkpoint bytes / bandwidth (training waits)")
    interval_s = min(math.sqrt(2 * write_s * mtbf_h * 3600), wall_h * 3600)
    f["checkpoint_interval_min"] = Figure(interval_s / 60, "min", "derived: Young's interval sqrt(2 x write time x "
                                                                  "job MTBF), at most the whole run")
    f["checkpoint_interval_tokens"] = Figure(tokens * interval_s / (wall_h * 3600), "tokens",
                                             "derived: tokens trained in one interval (train.ckpt_every = "
                                             "that / tokens per step)")
    launch = _given_or(restart_minutes, DEFAULT_RESTART_MINUTES, "min",
                       f"{DEFAULT_RESTART_MINUTES:g} min to notice a failure, re-rendezvous and start the "
                       f"workers (set --restart-minutes)")
    f["restart_launch_min"] = launch
    restart_s = launch.value * 60 + write_s
    f["restart_min"] = Figure(restart_s / 60, "min", "derived: launch + reading the checkpoint at the bandwidth")
    lost_s = failures * (restart_s + interval_s / 2) + (wall_h * 3600 / interval_s) * write_s
    f["time_lost_hours"] = Figure(lost_s / 3600, "hours", "derived: failures x (restart + half an interval "
                                                          "recomputed) + checkpoints x write time")
    f["time_lost_share"] = Figure(100 * lost_s / (wall_h * 3600), "% of wall-clock", "derived: time lost / "
                                                                                     "wall-clock time")
    return f


def gb(x: float) -> str:
    if x >= 100e9:
        return f"{x / 1e9:,.0f} GB"
    return f"{x / 1e9:.1f} GB" if x >= 1e9 or x == 0 else f"{x / 1e9:.2g} GB"


def require_fit(plan: Plan) -> None:
    """Raise a ChipshiftError saying by how much the run misses when nothing fits."""
    if plan.fits is not None:
        return
    c = int(plan.count.value)
    lean = min(plan.memory_rows, key=lambda r: r[0].total)[0]
    smallest = plan.memory_rows[-1][1]  # FSDP/ZeRO-3 + activation checkpointing
    if smallest is not None:
        hint = f"it fits on {smallest} chips with FSDP/ZeRO-3 + act. ckpt"
    else:
        cfg, seq = plan.model.cfg, int(plan.model.seq_len.value)
        floor = memory.memory_per_chip(float(plan.model.n_params.value), cfg, 1 << 20, "fsdp", True,
                                       memory.PRECISIONS[plan.chip.precision], int(plan.micro_batch.value), seq)
        hint = (f"no chip count fits: even sharded over any number of chips, one micro-batch of "
                f"{int(plan.micro_batch.value)} x {seq} tokens needs {gb(floor.total)} per chip "
                f"({gb(floor.activations)} activations with checkpointing, {gb(floor.gathered)} for two "
                f"gathered layers); shorten --seq-len or use a chip with more memory")
    raise ChipshiftError(
        f"{plan.model.label} does not fit on {c} x {plan.chip.key}: the leanest strategy ({lean.label}) "
        f"needs {gb(lean.total)} per chip, {gb(plan.shortfall_bytes)} more than the "
        f"{gb(plan.usable_bytes.value)} usable; {hint}")
