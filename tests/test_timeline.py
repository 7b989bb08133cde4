"""migrate_common.timeline: the per-packet recorder behind the daemons' --timeline."""

from __future__ import annotations

import json
import threading

import pytest

from migrate_common.timeline import Timeline
from protocol.errors import ConfigError


def test_off_by_default_records_nothing(tmp_path):
    tl = Timeline()
    tl.record("checkpoint", "downtime-start")
    tl.start()
    tl.write()
    assert tl.events is None and list(tmp_path.iterdir()) == []


def test_each_migration_replaces_the_previous_ones_file(tmp_path):
    path = tmp_path / "src.timeline"
    tl = Timeline()
    tl.enable(str(path))
    tl.start()
    tl.record("checkpoint", "downtime-start")
    worker = threading.Thread(target=tl.record, args=("queued", "dev0/vfio", 0),
                              name="save-thread")
    worker.start()
    worker.join()
    tl.write()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line[1:] for line in lines] == [["MainThread", "checkpoint", "downtime-start"],
                                            ["save-thread", "queued", "dev0/vfio", 0]]
    assert lines[0][0] <= lines[1][0]
    tl.start()
    tl.record("checkpoint", "vm-stopped")
    tl.write()
    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    assert line[2:] == ["checkpoint", "vm-stopped"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.timeline"]


def test_a_missing_directory_is_refused_at_once(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        Timeline().enable(str(tmp_path / "nowhere" / "src.timeline"))


def test_a_failed_write_loses_only_the_record(tmp_path):
    tl = Timeline()
    tl.enable(str(tmp_path / "t"))
    (tmp_path / "t.tmp").mkdir()  # the temporary file cannot be created
    tl.record("checkpoint", "downtime-start")
    tl.write()  # warns instead of raising into the migration
    assert not (tmp_path / "t").exists()
    assert tl.events == []


def test_a_migration_is_written_whatever_its_outcome(tmp_path):
    tl = Timeline()
    tl.enable(str(tmp_path / "t"))
    tl.record("checkpoint", "from the migration before")
    with pytest.raises(RuntimeError), tl.migration():
        tl.record("checkpoint", "downtime-start")
        raise RuntimeError("the migration failed")
    (line,) = [json.loads(text) for text in (tmp_path / "t").read_text().splitlines()]
    assert line[2:] == ["checkpoint", "downtime-start"]
