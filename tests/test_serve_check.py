"""The trainer-to-server check: the engine's log-probabilities against the training forward's,
a planted fault in the engine caught and named, the `parity serve-check` command."""

import json

import pytest
import torch

from chipshift.cli import main
from chipshift.infer.engine import Engine
from chipshift.parity.serve_check import THRESHOLDS, serve_check
from infer_helpers import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer_dir):
    return make_checkpoint(tiny_tokenizer_dir, tmp_path_factory.mktemp("serve-check") / "tiny-chat")


def test_float32_agrees_within_1e4_and_a_wrong_rope_offset_is_named(ckpt, monkeypatch):
    """float32 on the CPU: every prompt and generated token within 1e-4 of the trainer's, alone
    and batched. Then the engine's decode gives the second batched request (slot 1) RoPE
    positions 3 too far, its cache and mask untouched: that request, and only it, fails."""
    report = serve_check(ckpt, "cpu", "float32", log=lambda _: None)
    assert report["verdict"] == "pass" and report["failures"] == []
    assert report["max_abs"] <= 1e-4 and report["greedy_agreement"] >= 0.9
    assert [(r["run"], r["slot"]) for r in report["requests"]] == [("batch 1", 0)] * 4 + \
        [("batched", i) for i in range(4)]
    assert len({r["prompt_tokens"] for r in report["requests"]}) == 4  # requests at different offsets

    def decode_with_wrong_rope(self, ids, positions, rows, span):
        mask = (self.span_arange[:span][None, :] <= positions[:, None])[:, None, None, :]
        rope = positions.clone()
        if rows > 1:
            rope[1] += 3
        hidden = self.model.forward_hidden(ids, positions=rope[:, None], attn_mask=mask,
                                           cache=self.cache.decode(rows, positions, span))
        return self.model.logits(hidden[:, 0]).float()

    monkeypatch.setattr(Engine, "_decode_forward", decode_with_wrong_rope)
    faulty = serve_check(ckpt, "cpu", "float32", log=lambda _: None)
    assert faulty["verdict"] == "fail"
    failing = [r["name"] for r in faulty["requests"] if r["failures"]]
    assert failing == [f"batched request 1 (slot 1, {faulty['requests'][5]['prompt_tokens']}-token prompt)"]
    bad = faulty["requests"][5]
    assert bad["decode_max_abs"] > 100 * THRESHOLDS[torch.float32].max_abs and bad["prefill_max_abs"] <= 1e-4
    assert len(faulty["failures"]) == 1 and faulty["failures"][0].startswith("batched request 1 (slot 1")


def test_bfloat16_passes_its_thresholds(ckpt):
    """bfloat16 on whichever path the precision policy picks for this CPU (native, kernel
    twin, native decode step): within the thresholds measured for bfloat16, well above
    float32's differences (it is a coarser dtype, not the same numbers)."""
    report = serve_check(ckpt, "cpu", "bfloat16", log=lambda _: None)
    limits = THRESHOLDS[torch.bfloat16]
    assert report["verdict"] == "pass", report["failures"]
    assert 1e-4 < report["max_abs"] <= limits.max_abs and report["mean_abs"] <= limits.mean_abs
    assert report["dtype"] == "bfloat16"


def test_serve_check_command_exit_codes_and_json(ckpt, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main(["parity", "serve-check", str(ckpt), "--device", "cpu", "--dtype", "float32",
                 "--max-tokens", "4", "--json", str(out)]) == 0
    assert "serve check PASS" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["verdict"] == "pass" and {r["generated_tokens"] for r in saved["requests"]} == {4}
    # thresholds nobody could meet: exit 1, every request named
    assert main(["parity", "serve-check", str(ckpt), "--device", "cpu", "--dtype", "float32", "--max-tokens", "4",
                 "--max-abs", "0", "--mean-abs", "0", "--min-agreement", "1.01"]) == 1
    assert capsys.readouterr().out.count("FAIL batch") == 8
    assert main(["parity", "serve-check", str(ckpt), "--max-abs", "0.1"]) == 2
    assert "go together" in capsys.readouterr().err



def _serve_stage(check: bool = True):
    from chipshift.pipeline.recipe import Stage

    return Stage("serve", "serve", "cpu", "float32", 1, "pretrain",
                 {"prompts": ["hi"], "max_tokens": 3, "max_batch": 2, "check": check})


def test_a_failing_check_fails_the_serve_stage_before_it_serves(ckpt, monkeypatch):
    from types import SimpleNamespace

    from chipshift.errors import ChipshiftError
    from chipshift.pipeline.stages import run_serve

    monkeypatch.setattr("chipshift.parity.serve_check.THRESHOLDS",
                        {torch.float32: THRESHOLDS[torch.float32].__class__(0.0, 0.0, 1.01)})
    monkeypatch.setattr("subprocess.Popen", None)  # no server may start
    ctx = SimpleNamespace(recipe=SimpleNamespace(name="t"), model_of=lambda st: ckpt)
    with pytest.raises(ChipshiftError, match=r"serve check FAIL.*failing: batch 1 request 0 \(slot 0"):
        run_serve(ctx, _serve_stage())


@pytest.mark.slow
def test_the_serve_stage_checks_then_serves_and_the_report_shows_the_check(ckpt, tmp_path):
    """(slow: a server subprocess) The serve stage's result carries the check; the report's
    highlights carry its verdict and figures."""
    from types import SimpleNamespace

    from chipshift.pipeline.report import write_report
    from chipshift.pipeline.stages import run_serve

    ctx = SimpleNamespace(recipe=SimpleNamespace(name="t"), model_of=lambda st: ckpt)
    result = run_serve(ctx, _serve_stage())
    assert result.check["verdict"] == "pass" and result.check["dtype"] == "float32"
    assert len(result.samples) == 1
    state = {"stages": {"serve": {"kind": "serve", "status": "done", "device": "cpu", "dtype": "float32",
                                  "result": result.to_json()}}}
    write_report(tmp_path, state)
    md = (tmp_path / "report.md").read_text()
    assert "Serving engine vs training forward (serve): serve check PASS" in md
    assert f"max |diff| {result.check['max_abs']:.3g}" in md
