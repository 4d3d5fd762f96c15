"""Progress: a tqdm bar on a terminal (log records printed above it), plain log lines elsewhere."""

import io
import logging

from fsvfm_jax.progress import Progress


def test_bar_on_a_terminal_carries_counts_and_lets_log_records_through(capsys):
    stream = io.StringIO()
    logger = logging.getLogger("fsvfm_jax.test_progress")
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with Progress(3, "work", unit="files", stream=stream, interactive=True) as bar:
            for i in range(3):
                bar.update(1, bad=i)
            logger.warning("a record while the bar is up")
    finally:
        root.removeHandler(handler)
    text = stream.getvalue()
    assert "work" in text and "3/3" in text and "bad=2" in text and "files/s" in text
    assert "a record while the bar is up" in text
    assert root.handlers.count(handler) == 0 and not any("Tqdm" in type(h).__name__ for h in root.handlers)


def test_no_bar_in_a_log_only_lines(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="fsvfm_jax.progress"):
        with Progress(4, "stats", unit="images", stream=stream, log_every_s=0) as bar:
            bar.update(2)
            bar.update(2, skipped=1)
    assert stream.getvalue() == ""  # nothing drawn: no carriage returns in a batch log
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("stats: 2/4 images (") and "ETA" in lines[0]
    assert lines[-1].startswith("stats: 4/4 images (") and lines[-1].endswith("skipped 1")


def test_quiet_when_the_caller_logs_on_its_own(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="fsvfm_jax.progress"):
        with Progress(2, "pretrain", stream=stream, log_every_s=None) as bar:
            bar.update(2)
    assert stream.getvalue() == "" and not caplog.records
