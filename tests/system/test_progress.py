"""The progress bar: drawn on a terminal; in a log (stderr not a TTY) a line every N seconds."""

from __future__ import annotations

import io
import logging

from realflow.system.observe import MetricsWriter

STATS = {"actor_train": {"loss": 0.5, "reward/mean": 0.25}}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    """Advances `step_s` seconds each time it is read after `tick()`."""

    def __init__(self, step_s: float):
        self.t, self.step_s = 1000.0, step_s

    def tick(self) -> None:
        self.t += self.step_s

    def __call__(self) -> float:
        return self.t


def _writer(tmp_path, stream, clock=None, total=10):
    kwargs = {"clock": clock} if clock is not None else {}
    return MetricsWriter(
        str(tmp_path), total, False, True, ["actor_train"], stream=stream, **kwargs
    )


def test_not_a_tty_draws_no_bar_and_logs_a_line_every_30_s(tmp_path, caplog, capsys):
    clock, log = _Clock(step_s=10.0), io.StringIO()
    writer = _writer(tmp_path, log, clock)
    with caplog.at_level(logging.INFO, logger="realflow.system.observe"):
        for step in range(1, 11):
            clock.tick()
            writer.write(step, STATS, 10.0, ["actor_train"])
        writer.close()
    assert log.getvalue() == "" and capsys.readouterr().err == ""  # no bar, no carriage returns
    lines = [r.getMessage() for r in caplog.records if r.name == "realflow.system.observe"]
    # the first step, then one every >= 30 s (steps 4 and 7 at 10 s a step), and the last step
    assert [line.split(":")[0] for line in lines] == [
        "steps 1/10", "steps 4/10", "steps 7/10", "steps 10/10"
    ]  # fmt: skip
    assert lines[0] == "steps 1/10: reward/mean=0.25 loss=0.5 step_s=10"


def test_a_terminal_gets_the_bar(tmp_path, caplog):
    term = _Terminal()
    writer = _writer(tmp_path, term, total=3)
    with caplog.at_level(logging.INFO, logger="realflow.system.observe"):
        for step in range(1, 4):
            writer.write(step, STATS, 0.1, ["actor_train"])
        writer.close()
    out = term.getvalue()
    assert "\r" in out and "3/3" in out and "loss=0.5" in out and "step_s=0.1" in out
    assert not [r for r in caplog.records if r.name == "realflow.system.observe"]


def test_progress_bar_false_shows_nothing(tmp_path, caplog):
    for stream in (_Terminal(), io.StringIO()):
        writer = MetricsWriter(str(tmp_path), 2, False, False, ["actor_train"], stream=stream)
        with caplog.at_level(logging.INFO, logger="realflow.system.observe"):
            writer.write(1, STATS, 0.1, ["actor_train"])
            writer.close()
        assert stream.getvalue() == ""
    assert not [r for r in caplog.records if r.name == "realflow.system.observe"]
