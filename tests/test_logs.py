"""Logging: levels 1-5, hourly files with retention, JSON lines, and the level on reload."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from bigpipe.logs import HourlyFileHandler, Logging
from tests.support import Bigpipe, eventually, reload, rewrite, start_node


@pytest.fixture
def root_logger() -> Iterator[None]:
    """Logging() takes over the root logger; give it back to pytest afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logger")
def test_levels_filter_and_json_lines_land_in_the_hourly_file(tmp_path: Path) -> None:
    logs = Logging()
    logs.apply(2, str(tmp_path), "json")  # 2 = ERROR
    logging.getLogger("bigpipe.test").info("dropped: above the level")
    logging.getLogger("bigpipe.test").error("kept %d", 42)
    logs.stop()
    [path] = tmp_path.glob("bigpipe.*.log")
    assert path.name == time.strftime("bigpipe.%Y%m%d_%H.log")
    [line] = path.read_text().splitlines()
    entry = orjson.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "ERROR",
        "bigpipe.test",
        "kept 42",
    )


def test_a_new_hour_opens_a_new_file_and_old_files_are_pruned(tmp_path: Path) -> None:
    stale = tmp_path / "bigpipe.20000101_00.log"
    stale.write_text("old\n")
    os.utime(stale, (0, 0))
    handler = HourlyFileHandler(tmp_path, retention_hours=1)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for hours_ago in (2, 0):
        record = logging.makeLogRecord({"msg": f"{hours_ago}h ago"})
        record.created = time.time() - hours_ago * 3600
        handler.emit(record)
    handler.close()
    names = sorted(p.name for p in tmp_path.glob("bigpipe.*.log"))
    assert len(names) == 2 and stale.name not in names


async def test_the_level_changes_on_reload(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)
    rewrite(bigpipe, **{"log.level": 2})
    await reload(bigpipe, http)
    assert "reloaded" not in bigpipe.log_tail(), "at ERROR the INFO line is dropped"
    rewrite(bigpipe, **{"log.level": 4})
    await reload(bigpipe, http)
    await eventually(
        lambda: "INFO bigpipe.node.reload: reloaded" in bigpipe.log_tail(),
        5,
        "the INFO line, back at level 4",
    )
    # The log is written by a thread: only now is it sure the first line never came.
    assert bigpipe.log_tail().count("bigpipe.node.reload: reloaded") == 1


@pytest.mark.usefixtures("root_logger")
def test_a_failed_write_costs_that_line_only_not_the_logging_thread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line that cannot be written (its directory gone when the hour turns) is reported
    on stderr; the listener thread lives on and writes the lines after it."""
    directory = tmp_path / "logs"
    logs = Logging()
    logs.apply(4, str(directory))
    logger = logging.getLogger("bigpipe.test")
    logger.info("first")
    logs.stop()  # flushes: the first file exists
    logs.apply(4, str(directory))
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    next_hour = logging.makeLogRecord(
        {"name": "bigpipe.test", "levelno": logging.INFO, "msg": "lost"}
    )
    next_hour.created = time.time() + 3600  # the hour turns: a new file in a missing directory
    logger.handle(next_hour)
    reported = ""
    deadline = time.monotonic() + 10
    while "FileNotFoundError" not in reported:  # the listener thread reports the lost line
        assert time.monotonic() < deadline, "the lost line was never reported on stderr"
        time.sleep(0.05)
        reported += capsys.readouterr().err
    directory.mkdir()
    logger.info("after")
    logs.stop()
    lines = [line for p in directory.glob("bigpipe.*.log") for line in p.read_text().splitlines()]
    assert any(line.endswith("bigpipe.test: after") for line in lines), "the thread died"


def test_a_log_file_removed_while_pruning_is_no_error(tmp_path: Path) -> None:
    """Another process (logrotate, a second worker) may remove a file between the listing
    and its stat: pruning skips it."""
    handler = HourlyFileHandler(tmp_path, retention_hours=1)
    vanishing = tmp_path / "bigpipe.20000101_00.log"
    vanishing.write_text("old\n")
    real_stat = Path.stat

    def stat_after_removal(path: Path, **kwargs: bool) -> os.stat_result:
        if path == vanishing:
            path.unlink(missing_ok=True)
        return real_stat(path, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "stat", stat_after_removal)
        handler._prune()
    handler.close()
    assert not vanishing.exists()
