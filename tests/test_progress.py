"""The progress line: in-place redraws on a terminal, a line every interval in a log, and its rate and
ETA arithmetic, all on a fake clock."""

from __future__ import annotations

import io

import pytest

from ovis_batch.progress import ProgressLine, format_duration, format_rate, live_progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0  # any origin: the line measures from its own start

    def __call__(self) -> float:
        return self.now


def test_terminal_line_is_redrawn_in_place_with_rates_and_eta():
    clock, out = FakeClock(), io.StringIO()
    line = ProgressLine(10, out, live=True, clock=clock, width=200)
    clock.now += 2
    line.add(4, 3, 40)  # a shard of 4 rows, 3 ok, 40 output tokens, 2 s after the start
    assert out.getvalue() == (
        "\r[####........] 4/10 rows (40%), 3 ok, 1 error | 2.00 images/s, 20.0 output tokens/s | "
        "elapsed 0:02, ETA 0:03\x1b[K"
    )
    clock.now += 1
    line.tick()  # the timer redraws: elapsed moves, the rate falls, the ETA follows
    assert out.getvalue().split("\r")[-1] == (
        "[####........] 4/10 rows (40%), 3 ok, 1 error | 1.33 images/s, 13.3 output tokens/s | "
        "elapsed 0:03, ETA 0:04\x1b[K"
    )
    clock.now += 3
    line.add(6, 6, 60)
    line.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\x1b[K\n")  # one line on screen, finished at close
    assert text.count("\r") == 4  # add, tick, add, close: each redraw starts at the left margin
    assert text.split("\r")[-1] == (
        "[############] 10/10 rows (100%), 9 ok, 1 error | 1.67 images/s, 16.7 output tokens/s | "
        "elapsed 0:06, ETA 0:00\x1b[K\n"
    )


def test_terminal_line_never_wraps():
    out = io.StringIO()
    line = ProgressLine(10, out, live=True, clock=FakeClock(), width=40)
    line.add(1, 1, 5)
    drawn = out.getvalue().removeprefix("\r").removesuffix("\x1b[K")
    assert len(drawn) == 39 and drawn.startswith("[#...........] 1/10 rows")


def test_log_gets_a_line_every_interval_and_the_final_figures():
    clock, out = FakeClock(), io.StringIO()
    line = ProgressLine(100, out, live=False, interval_s=30, clock=clock)
    clock.now += 10
    line.add(20, 19, 100)
    clock.now += 19.9
    line.tick()
    assert out.getvalue() == ""  # 29.9 s: not yet
    clock.now += 0.1
    line.tick()
    clock.now += 15
    line.add(30, 30, 150)  # 45 s: the next line is due at 60 s
    line.tick()
    clock.now += 5
    line.close()
    line.close()  # closing twice writes nothing more
    assert out.getvalue().splitlines() == [
        "progress: 20/100 rows (20%), 19 ok, 1 error | 0.667 images/s, 3.33 output tokens/s | "
        "elapsed 0:30, ETA 2:00",
        "progress: 50/100 rows (50%), 49 ok, 1 error | 1.00 images/s, 5.00 output tokens/s | "
        "elapsed 0:50, ETA 0:50",
    ]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_eta_is_unknown_before_the_first_shard_and_zero_when_done():
    clock, out = FakeClock(), io.StringIO()
    line = ProgressLine(3, out, live=False, clock=clock)
    clock.now += 90
    assert line.text().endswith("| 0 images/s, 0 output tokens/s | elapsed 1:30, ETA ?")
    line.add(3, 0, 0)
    assert line.text().startswith("3/3 rows (100%), 0 ok, 3 error |") and line.text().endswith("ETA 0:00")
    assert ProgressLine(0, out, live=False, clock=clock).text().startswith("0/0 rows (100%)")


def test_eta_from_the_mean_rate_of_the_run():
    clock = FakeClock()
    line = ProgressLine(100_000, io.StringIO(), live=False, clock=clock)
    clock.now += 600
    line.add(1500, 1500, 0)  # 2.5 rows/s over 10 minutes: 98,500 rows left take 39,400 s
    assert line.text().endswith("elapsed 10:00, ETA 10:56:40")


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0:00"), (59.4, "0:59"), (61, "1:01"), (3599.6, "1:00:00"), (3725, "1:02:05")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("rate", "text"), [(0, "0"), (0.2994, "0.299"), (5.738, "5.74"), (51.24, "51.2"), (1234.4, "1234")]
)
def test_format_rate(rate, text):
    assert format_rate(rate) == text


def test_live_progress_writes_the_final_line_when_the_job_fails():
    out = io.StringIO()  # not a terminal: log lines
    with pytest.raises(RuntimeError), live_progress(4, out, interval_s=3600) as line:
        line.add(2, 2, 8)
        raise RuntimeError("a shard failed")
    assert out.getvalue().startswith("progress: 2/4 rows (50%), 2 ok, 0 error |")
    assert out.getvalue().count("\n") == 1


def test_no_stream_no_progress():
    with live_progress(4, None) as line:
        assert line is None


def test_a_label_starts_the_line_and_the_figures_stay_the_same():
    """A suite running several caption jobs says which one a line counts; without a label the line is
    the caption job's own, character for character."""
    plain_log, log, plain_terminal, terminal = (io.StringIO() for _ in range(4))
    lines = [
        ProgressLine(8, plain_log, live=False, clock=FakeClock()),
        ProgressLine(8, log, live=False, clock=FakeClock(), label="MMBench_DEV_EN"),
        ProgressLine(8, plain_terminal, live=True, clock=FakeClock(), width=200),
        ProgressLine(8, terminal, live=True, clock=FakeClock(), width=200, label="POPE"),
    ]
    for line in lines:
        line.add(2, 2, 10)
        line.close()
    figures = "2/8 rows (25%), 2 ok, 0 error | 0 images/s, 0 output tokens/s | elapsed 0:00, ETA ?"
    assert plain_log.getvalue() == f"progress: {figures}\n"
    assert log.getvalue() == f"progress [MMBench_DEV_EN]: {figures}\n"
    assert plain_terminal.getvalue().split("\r")[-1] == f"[###.........] {figures}\x1b[K\n"
    assert terminal.getvalue().split("\r")[-1] == f"POPE: [###.........] {figures}\x1b[K\n"


def test_live_progress_passes_the_label_on():
    out = io.StringIO()
    with live_progress(4, out, interval_s=3600, label="MME") as line:
        line.add(4, 3, 8)
    assert out.getvalue().startswith("progress [MME]: 4/4 rows (100%), 3 ok, 1 error |")
