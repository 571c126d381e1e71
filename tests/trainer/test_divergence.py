"""The trainer's divergence guard: mixed batches (short lesson answers, replay rows) do not trip it; a run whose
loss explodes after the first steps does."""

from academyd.trainer.loop import exploding


def test_a_low_first_batch_among_mixed_ones_is_not_divergence() -> None:
    early: list[float] = []
    assert [exploding(early, x) for x in (1.32, 8.94, 3.1, 7.5, 2.2, 6.0, 4.0)] == [None] * 7


def test_a_loss_that_explodes_later_is() -> None:
    early: list[float] = []
    for x in (2.0, 1.8, 1.9, 1.7, 1.6):
        assert exploding(early, x) is None
    assert exploding(early, 9.0) is None and exploding(early, 10.5) == 2.0
