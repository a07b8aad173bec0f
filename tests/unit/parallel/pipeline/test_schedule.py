"""The 1F1B schedule with and without text-ahead: every micro-batch's work once per stage in a valid order,
backwards in micro-batch order, no deadlock, and the bubble of the textbook formula."""

import pytest

from megacoca.parallel.pipeline.schedule import schedule_table, simulate, stage_actions


@pytest.mark.parametrize("pp, m", [(2, 2), (2, 8), (4, 4), (4, 9), (8, 8)])
@pytest.mark.parametrize("text_ahead", [0, 1, 3, 100])
def test_every_stage_runs_each_micro_batch_once_in_order(pp, m, text_ahead):
    for stage in range(pp):
        actions = stage_actions(stage, pp, m, text_ahead)
        forwards = [k for kind, k in actions if kind == "F"]
        backwards = [k for kind, k in actions if kind == "B"]
        texts = [k for kind, k in actions if kind == "T"]
        assert forwards == list(range(m)) and backwards == list(range(m))
        for k in range(m):
            assert actions.index(("F", k)) < actions.index(("B", k))
            if texts:
                assert actions.index(("T", k)) < actions.index(("F", k))
        assert texts == (list(range(m)) if stage == pp - 1 and text_ahead > 0 else [])
        # in flight: at most pp - stage forwards without their backward (1F1B's memory bound)
        live = peak = 0
        for kind, _ in actions:
            live += {"F": 1, "B": -1, "T": 0}[kind]
            peak = max(peak, live)
        assert peak <= min(pp - stage, m)


def test_text_ahead_runs_the_first_text_forwards_before_the_first_forward():
    actions = stage_actions(1, 2, 6, text_ahead=3)
    assert actions[:4] == [("T", 0), ("T", 1), ("T", 2), ("F", 0)]
    assert stage_actions(1, 2, 6, text_ahead=0)[:2] == [("F", 0), ("B", 0)]


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (4, 16), (8, 8)])
def test_bubble_of_balanced_stages_is_the_textbook_fraction(pp, m):
    result = simulate(pp, m)
    expected = (pp - 1) / (m + pp - 1)
    assert all(idle == pytest.approx(expected) for idle in result["idle"])


def test_text_ahead_shortens_the_step_when_the_text_tower_waits_on_the_critical_path():
    forward = [1.0, 1.0, 1.0, 0.7]
    plain = simulate(4, 8, 0, forward=forward, text=0.3)["makespan"]
    ahead = simulate(4, 8, 3, forward=forward, text=0.3)["makespan"]
    assert ahead < plain


def test_table_lists_each_stage():
    table = schedule_table(2, 3, text_ahead=1)
    assert table.splitlines()[2].startswith("| 0 | F0 | F1 | B0 |")
    assert "| 1 | T0 | F0 | B0 | T1 | F1 |" in table


def test_timeline_puts_every_action_on_a_common_clock():
    from megacoca.parallel.pipeline.schedule import timeline_table

    plain, ahead = timeline_table(4, 8, 0), timeline_table(4, 8, 3)
    assert len(plain.splitlines()) == 2 + 4
    assert plain.splitlines()[0].count("|") - 2 == 38 and ahead.splitlines()[0].count("|") - 2 == 35
    assert "| 3 | T0 | T1 | T2 | F0 |" in ahead


def test_auto_text_ahead_is_the_smallest_count_the_simulation_gains_from():
    from megacoca.config.flavors import get_flavor
    from megacoca.parallel.pipeline.schedule import auto_text_ahead
    from megacoca.parallel.pipeline.split import split_stages

    for flavor, pp in (("coca_base", 4), ("coca_giant", 8), ("coca_tiny", 2)):
        split = split_stages(get_flavor(flavor), pp)
        stage = [float(f) for f in split.stage_flops()]
        text = float(split.text_tower_flops)
        forward = [*stage[:-1], stage[-1] - text]
        for m in (pp, 2 * pp, 16):
            chosen = auto_text_ahead(split, pp, m)
            plain = simulate(pp, m, 0, forward=forward, text=text)["makespan"]
            spans = {t: simulate(pp, m, t, forward=forward, text=text)["makespan"] for t in range(0, m + 1)}
            if chosen == 0:
                assert min(spans.values()) >= plain * (1 - 1e-9)
            else:
                assert spans[chosen] == min(spans.values()) < plain
                assert all(spans[t] > spans[chosen] for t in range(1, chosen))
            # ZeRO-3 without keep-gathered: each text-ahead forward is an engine forward of its own: off
            assert auto_text_ahead(split, pp, m, separate_forward_costs=True) == 0
    assert auto_text_ahead(split_stages(get_flavor("coca_tiny"), 1), 1, 4) == 0


def test_auto_text_ahead_is_off_when_the_last_stage_does_not_wait():
    """A split whose last stage is far the lightest: the text tower never holds up the critical path."""
    from types import SimpleNamespace

    from megacoca.parallel.pipeline.schedule import auto_text_ahead

    light_last = SimpleNamespace(stage_flops=lambda: [100, 100, 100, 12], text_tower_flops=4)
    assert auto_text_ahead(light_last, 4, 8) == 0
    heavy_last = SimpleNamespace(stage_flops=lambda: [10, 10, 10, 40], text_tower_flops=20)
    assert auto_text_ahead(heavy_last, 4, 8) >= 1
