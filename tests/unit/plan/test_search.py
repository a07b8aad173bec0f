"""The search's choices and a pinned layout: text-ahead chosen by the time model (off where it predicts no gain, as
under ZeRO-3 without keep-gathered, where each text-ahead forward is an engine forward of its own), keep-gathered
searched under a pipeline with ZeRO-3, and `pin`'s one-line refusals of layouts megacoca cannot run."""

import dataclasses

import pytest

from megacoca.config.flavors import get_flavor
from megacoca.config.layout import Layout
from megacoca.plan.memory import predict
from megacoca.plan.presets import PRESETS
from megacoca.plan.search import check_pinned, layouts, pin, plan, text_ahead_choices
from megacoca.plan.timing import predict_time, separate_text_forward_s

TINY = get_flavor("coca_tiny", vision_layers=4, kernels="torch")
# a profile whose ZeRO-3 engine forward costs what a CPU rank's does (calibrated: ~25 ms per micro-batch, ~180 us
# per tensor), so that a text-ahead forward apart costs more than the bubble it fills
CPU_LIKE = dataclasses.replace(PRESETS["a100-80gb"], micro_overhead_s={"3": 25e-3}, tensor_overhead_s={"3": 180e-6})


def test_text_ahead_under_zero3_costs_an_engine_forward_only_without_keep_gathered():
    base = Layout(pp=2, dp=1, zero_stage=3, micro_batch=4, grad_accum=4, text_ahead=2)
    assert separate_text_forward_s(TINY, base, CPU_LIKE) > 0
    assert separate_text_forward_s(TINY, base.replace(keep_gathered=True), CPU_LIKE) == 0
    assert separate_text_forward_s(TINY, base.replace(zero_stage=1), CPU_LIKE) == 0
    assert separate_text_forward_s(TINY, base.replace(text_ahead=0), CPU_LIKE) == 0
    slower = predict_time(TINY, base, CPU_LIKE).seconds
    assert slower > predict_time(TINY, base.replace(text_ahead=0), CPU_LIKE).seconds


def test_the_planner_turns_text_ahead_off_where_it_predicts_no_gain():
    zero3 = Layout(pp=2, dp=1, zero_stage=3, micro_batch=4, grad_accum=8, text_ahead=3)
    best, time = text_ahead_choices(TINY, zero3, CPU_LIKE)[0]
    assert best.text_ahead == 0 and time.seconds == predict_time(TINY, best, CPU_LIKE).seconds
    # the choices are each layout's own prediction, fastest first, off first on a tie
    choices = text_ahead_choices(TINY, zero3.replace(keep_gathered=True), CPU_LIKE)
    assert [t.seconds for _, t in choices] == sorted(t.seconds for _, t in choices)
    assert {layout.text_ahead for layout, _ in choices} == {0, 3}
    plans, _ = plan(TINY, CPU_LIKE, 2, 32, kernels="torch", pp_values=[2], zero_stages=[3])
    for item in plans:
        if not item.layout.keep_gathered:
            assert item.layout.text_ahead == 0, item.layout.describe()
        options = text_ahead_choices(TINY, item.layout.replace(text_ahead=0), CPU_LIKE)
        assert item.time.seconds == min(t.seconds for _, t in options)


def test_keep_gathered_is_searched_under_a_pipeline_with_zero3_only():
    found = list(layouts(TINY, 4, 32, "bf16", 8, tp_values=[1]))
    assert any(layout.keep_gathered for layout in found)
    assert all(layout.pp > 1 and layout.zero_stage == 3 for layout in found if layout.keep_gathered)


def test_pin_predicts_the_named_layout():
    layout = Layout(tp=2, pp=2, dp=2, zero_stage=3, micro_batch=4, grad_accum=2, keep_gathered=True,
                    text_ahead=-1, kernels="torch")
    pinned = pin(TINY, layout, PRESETS["h100"])
    assert pinned.layout.text_ahead >= 0 and len(pinned.memory) == 2
    expected = predict(TINY, pinned.layout)
    assert [stage.peak for stage in pinned.memory] == [stage.peak for stage in expected]
    fixed = pin(TINY, layout.replace(text_ahead=1), PRESETS["h100"])
    assert fixed.layout.text_ahead == 1


@pytest.mark.parametrize("layout, reason", [
    (Layout(tp=3, zero_stage=1), "tp"),
    (Layout(pp=2, zero_stage=1, grad_accum=1), "at least 2 micro-batches"),
    (Layout(pp=8, zero_stage=1, grad_accum=8), "pp"),
    (Layout(zero_stage=0, precision="bf16"), "ZeRO-0 trains in fp32"),
    (Layout(zero_stage=1, keep_gathered=True), "needs zero=3 and pp > 1"),
    (Layout(pp=2, zero_stage=1, grad_accum=4, keep_gathered=True), "needs zero=3 and pp > 1"),
    (Layout(zero_stage=1, text_ahead=2), "needs pp > 1"),
    (Layout(pp=2, zero_stage=1, grad_accum=2, text_ahead=3), "more than the step's 2 micro-batches"),
])
def test_impossible_layouts_are_refused_with_the_reason(layout, reason):
    with pytest.raises(ValueError, match=reason) as error:
        check_pinned(TINY, layout)
    assert "\n" not in str(error.value)


def test_an_emitted_config_keeps_the_pipeline_choices():
    from megacoca.plan.search import Plan, emit_config

    layout = Layout(pp=2, dp=2, zero_stage=3, micro_batch=4, grad_accum=4, text_ahead=0, keep_gathered=True)
    parallel = emit_config(Plan(layout, [], None), "coca_tiny")["parallel"]
    assert parallel["pipeline_keep_gathered"] is True and parallel["text_ahead"] == 0 and parallel["pp"] == 2
