"""The live view's frames and sentences, from metric rows and statuses written by hand."""

from __future__ import annotations

from lora_studio.ui import charts

ROWS = [
    {"step": 1, "loss": 2.0, "lr": 1e-4, "lrs": [1e-4, 1.6e-3], "tokens_per_s": 100.0, "peak_rss_mb": 500.0,
     "elapsed_s": 1.0, "eta_s": 9.0},
    {"step": 2, "loss": 0.0, "lr": 2e-4, "lrs": [2e-4, 3.2e-3], "tokens_per_s": 120.0, "peak_rss_mb": 510.0,
     "eval_loss": 1.5, "elapsed_s": 2.0, "eta_s": 8.0},
    {"step": 3, "loss": float("nan"), "lr": 3e-4, "tokens_per_s": 110.0, "peak_rss_mb": 520.0},
]  # fmt: skip


def test_loss_keeps_zeros_drops_nan_and_adds_eval():
    frame = charts.loss_frame(ROWS)
    assert frame.values.tolist() == [[1, 2.0, "train"], [2, 0.0, "train"], [2, 1.5, "eval"]]


def test_lr_has_one_line_per_parameter_group():
    frame = charts.lr_frame(ROWS)
    assert sorted(set(frame["series"])) == ["group 0", "group 1", "lr"]
    assert frame[frame.series == "group 1"]["lr"].tolist() == [1.6e-3, 3.2e-3]


def test_memory_draws_the_estimate_as_a_reference_line():
    frame = charts.memory_frame(ROWS, estimate_mb=600.0)
    measured = frame[frame.series == "measured peak RSS"]
    assert measured["MiB"].tolist() == [500.0, 510.0, 520.0]
    assert frame[frame.series == "estimate"].values.tolist() == [[1, 600.0, "estimate"], [3, 600.0, "estimate"]]
    gpu = charts.memory_frame([{**r, "cuda_peak_mb": 42.0} for r in ROWS], None)
    assert set(gpu["series"]) == {"measured GPU peak"} and set(gpu["MiB"]) == {42.0}


def test_memory_of_several_ranks_has_one_line_per_rank():
    rows = [{**r, "rank_peak_mb": [500.0 + r["step"], 300.0]} for r in ROWS]
    frame = charts.memory_frame(rows, estimate_mb=450.0)
    assert frame[frame.series == "measured peak RSS, rank 1"]["MiB"].tolist() == [300.0] * 3
    assert frame[frame.series == "measured peak RSS, rank 0"]["MiB"].tolist() == [501.0, 502.0, 503.0]
    assert set(frame.series) == {"measured peak RSS, rank 0", "measured peak RSS, rank 1", "estimate per rank"}
    one = charts.memory_frame(rows, None, per_rank=False)  # the Runs tab's overlay: one line per run
    assert set(one.series) == {"measured peak RSS"} and len(one) == 3


def test_progress_bar_and_eta():
    bar = charts.progress_html({"state": "running", "step": 2, "total_steps": 8}, ROWS[:2])
    assert 'data-step="2" data-total="8"' in bar and "25%" in bar and "ETA 0:08" in bar
    assert charts.progress_html({"state": "queued"}, []) == ""


def test_every_state_is_said_plainly():
    assert "queued** (position 2)" in charts.status_markdown("r", {"state": "queued", "queue_position": 2})
    assert "training**, step 3 of 10, loss 0.5000" in charts.status_markdown(
        "r", {"state": "running", "step": 3, "total_steps": 10, "loss": 0.5}
    )
    assert "Stop requested" in charts.status_markdown("r", {"state": "running", "stopping": "stop"})
    compiling = charts.status_markdown("r", {"state": "running", "step": 6, "compile": "auto: compiling (…)", "compile_s": 17.2})
    assert "Compile: auto: compiling (…) (17 s compiling so far)." in compiling
    done = charts.status_markdown("r", {"state": "done", "step": 10}, "/runs/r")
    assert "finished** after 10 steps" in done and "`/runs/r`" in done and "Compare" in done
    assert "resume the run" in charts.status_markdown("r", {"state": "stopped", "step": 4})
    failed = charts.status_markdown(
        "r", {"state": "failed", "step": 0, "error": "data.jsonl, row 3, field 'output': missing", "log_tail": "boom"}
    )
    assert "row 3" in failed and "Data** tab" in failed and "boom" in failed
    assert "No run yet" in charts.status_markdown(None, {})


def test_duration():
    assert (charts.duration(59.6), charts.duration(3725), charts.duration(None)) == ("1:00", "1:02:05", "—")


def test_empty_frames_are_typed_as_numbers():
    """The first value a plot gets fixes its scales: an empty frame must not say 'categorical'."""
    for empty in (charts.loss_frame([]), charts.memory_frame([], 100.0), charts.lr_frame([]), charts.speed_frame([])):
        assert empty.empty
        assert str(empty["step"].dtype) == "int64"
        assert all(str(empty[c].dtype) == "float64" for c in empty.columns if c not in ("step", "series"))


def test_an_empty_plot_gets_no_value():
    assert charts.plot_value(charts.loss_frame([])) is None
    assert len(charts.plot_value(charts.loss_frame(ROWS))) == 3


def test_live_loss_has_its_eval_series_before_the_first_eval():
    frame = charts.live_loss_frame(ROWS[:1], has_eval=True)
    assert frame["series"].tolist() == ["train", "eval"] and frame["loss"].isna().tolist() == [False, True]
    assert charts.live_loss_frame(ROWS[:1], has_eval=False)["series"].tolist() == ["train"]
    assert charts.live_loss_frame(ROWS, has_eval=True)["series"].tolist().count("eval") == 1  # the real one only
    assert charts.live_loss_frame([], has_eval=True).empty


def test_probe_answers_by_step():
    rows = [{"step": 2, "prompt": "a?", "reply": "x"}, {"step": 2, "prompt": "b?", "reply": "y"},
            {"step": 4, "prompt": "a?", "reply": "z"}]  # fmt: skip
    frame = charts.probes_frame(rows)
    assert list(frame.columns) == ["step", "a?", "b?"]
    assert frame.fillna("").values.tolist() == [[2, "x", "y"], [4, "z", ""]]
    assert list(charts.probes_frame([]).columns) == ["step"]


def test_train_tab_settings_carry_probes_and_early_stop():
    from lora_studio.ui.settings import Limits
    from lora_studio.ui.train_tab import FIELDS, apply_limits, build_config
    from tests.ui.test_api_train import settings

    values = dict(zip(FIELDS, settings("m", probes="Say hi\n\n  Say bye \n", early_stop=3, val_fraction=0.2)))
    cfg = build_config(values, {"data": "d.jsonl"})
    assert cfg.probes == ["Say hi", "Say bye"] and cfg.early_stop == 3

    class Fake:  # apply_limits reads only studio.settings.limits
        class settings:
            limits = Limits.none()
            limits.batch_prompts, limits.new_tokens = 1, 16

    caller = type("C", (), {"admin": False})()
    import pytest

    with pytest.raises(ValueError, match="probes: 2 prompts is over this server's limit of 1"):
        apply_limits(Fake, cfg, caller)
    cfg.probes = ["Say hi"]
    assert apply_limits(Fake, cfg, caller)[0].probe_max_new_tokens == 16  # probe answers are replies: capped


def test_status_says_why_a_run_stopped_early():
    reason = "early stop at step 7: eval_loss did not improve for 2 evaluation(s); the adapter is from step 5 (eval_loss 1.2000)"
    text = charts.status_markdown("r1", {"state": "done", "step": 7, "stop_reason": reason})
    assert "stopped early" in text and "at step 7" in text and "from step 5" in text
    assert "stopped early" not in charts.status_markdown("r1", {"state": "done", "step": 7})


def test_a_run_on_several_processes_says_how_many_and_the_strategy():
    text = charts.status_markdown("r1", {"state": "running", "step": 3, "total_steps": 9, "world_size": 4, "strategy": "fsdp"})
    assert "training** on 4 processes (FSDP), step 3 of 9" in text
    assert "processes" not in charts.status_markdown("r1", {"state": "running", "step": 3, "world_size": 1})
