"""`chipshift eval`: lm-evaluation-harness (the pinned `lm-eval` library) against `chipshift
serve`, the offline tasks shipped in its YAML format, and the score delta between two targets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from chipshift.cli import main
from chipshift.data.eval_tasks import SHIPPED, TASKS, build_tasks
from chipshift.errors import ChipshiftError
from chipshift.parity.harness import bootstrap_delta, score_delta
from infer_helpers import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer_dir):
    return make_checkpoint(tiny_tokenizer_dir, tmp_path_factory.mktemp("harness") / "tiny-chat")


@pytest.mark.any_class
def test_the_shipped_tasks_are_what_the_builder_makes_from_the_corpora(tmp_path):
    build_tasks(tmp_path)
    shipped = sorted(p.name for p in SHIPPED.iterdir() if p.is_file())
    assert shipped == sorted(p.name for p in tmp_path.iterdir())
    assert {f"{t}.yaml" for t in TASKS} | {f"{t}.jsonl" for t in TASKS} | {"docs.py"} == set(shipped)
    for name in shipped:
        assert (SHIPPED / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_bootstrap_interval_of_a_paired_delta():
    same = [1.0, 0.0, 1.0, 1.0, 0.0] * 20
    assert bootstrap_delta(same, same) == (0.0, 0.0, 0.0)
    zeros = [i for i, x in enumerate(same) if x == 0.0]
    better = [1.0 if i in zeros[:10] else x for i, x in enumerate(same)]  # B right where A was, and on 10 more
    delta, lo, hi = bootstrap_delta(same, better)
    assert delta == pytest.approx(0.1) and 0 < lo < delta < hi
    with pytest.raises(ChipshiftError, match="scored 3 and 2 items"):
        bootstrap_delta([1.0] * 3, [1.0] * 2)
    a = {"target": "cpu:float32", "tasks": {"t": {"n": 100, "acc": 0.6, "items": {"acc": same}}}}
    b = {"target": "cpu:bfloat16", "tasks": {"t": {"n": 100, "acc": 0.7, "items": {"acc": better}}}}
    row = score_delta(a, b)["tasks"]["t"]["acc"]
    assert row["items_differ"] == 10 and row["delta"] == pytest.approx(0.1)


def test_scoring_requests_ask_the_server_to_ignore_eos():
    """local-completions drops the last returned entry as the generated token; a stop token
    returns none, so without ignore_eos the continuation's last token would be dropped."""
    from lm_eval.api.registry import get_model

    from chipshift.parity.harness import MODEL, _register_model

    _register_model()
    lm = get_model(MODEL).__new__(get_model(MODEL))  # no server: only the payloads are built
    lm.model, lm._max_gen_toks = "m", 8
    scoring = lm._create_payload([[1, 2, 3]], generate=False)
    assert scoring["echo"] and scoring["logprobs"] == 1 and scoring["max_tokens"] == 1 and scoring["ignore_eos"]
    generating = lm._create_payload([[1]], generate=True, gen_kwargs={"until": ["\n"]})
    assert "ignore_eos" not in generating


@pytest.mark.any_class
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys):  # checked before the checkpoint is read
    ckpt = tmp_path / "ckpt"
    assert main(["eval", str(ckpt), "--tasks", "chipshift", "--limit", "0"]) == 2
    assert "--limit = 0" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--tasks", "no_such_task", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown task 'no_such_task'" in err and "chipshift_sanguo_cloze" in err


@pytest.mark.slow
def test_scores_through_chipshift_serve_equal_lm_eval_hf_model_on_the_export(ckpt, tmp_path):
    """lm-eval's local-completions against chipshift serve (float32) and lm-eval's own `hf`
    model on the exported Hugging Face folder score the same items the same: every choice's
    log-likelihood within 1e-3, hence every score equal, well within the harness's stderr."""
    from chipshift.model.hf import export_hf
    from chipshift.parity.harness import evaluate, evaluate_checkpoint

    ours = evaluate_checkpoint(ckpt, ["chipshift"], "cpu", "float32", limit=12, log=lambda _: None)
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    theirs = evaluate("hf", {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu", "max_length": 512},
                      ["chipshift"], limit=12, log=lambda _: None)
    assert set(ours["tasks"]) == set(TASKS) == set(theirs["tasks"])
    for task in TASKS:
        a, b = ours["tasks"][task], theirs["tasks"][task]
        assert a["n"] == b["n"] == 12
        worst = max(abs(x - y) for ra, rb in zip(a["items"]["loglik"], b["items"]["loglik"]) for x, y in zip(ra, rb))
        assert worst < 1e-3, (task, worst)
        for m in ("acc", "acc_norm"):
            assert abs(a[m] - b[m]) <= max(a[f"{m}_stderr"], 1e-9), (task, m)


@pytest.mark.slow
def test_the_eval_stage_reports_the_float32_bfloat16_delta_with_its_interval(ckpt, tmp_path):
    from chipshift.pipeline.recipe import Stage
    from chipshift.pipeline.report import write_report
    from chipshift.pipeline.stages import run_eval

    stage = Stage("eval", "eval", "cpu", "float32", 1, "sft",
                  {"identity": False, "preference": False, "pairs": 0, "prompts": [], "max_new_tokens": 4,
                   "tasks": ["chipshift_identity", "chipshift_sanguo_cloze"], "compare": "cpu:bfloat16", "limit": 10})
    result = run_eval(SimpleNamespace(model_of=lambda st: ckpt), stage)
    delta = result.harness["delta"]
    assert [r["target"] for r in result.harness["runs"]] == ["cpu:float32", "cpu:bfloat16"]
    row = delta["tasks"]["chipshift_sanguo_cloze"]["acc"]
    assert row["n"] == 10 and row["ci"][0] <= row["delta"] <= row["ci"][1]
    assert "chipshift_identity_acc" in result.metrics
    state = {"stages": {"eval": {"kind": "eval", "status": "done", "device": "cpu", "dtype": "float32",
                                 "result": result.to_json()}}}
    write_report(tmp_path, state)
    md = (tmp_path / "report.md").read_text()
    assert "lm-eval (eval): chipshift_sanguo_cloze acc" in md and "95% CI" in md
    assert "## Benchmarks (lm-evaluation-harness)" in md and "cpu:bfloat16" in md
