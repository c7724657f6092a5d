"""lora_studio/engine/run.py: the run's lifecycle; the one writer of status.json."""

from __future__ import annotations

from pathlib import Path

import lora_studio.engine


def test_run_py_is_the_one_writer_of_status_json_in_the_engine():
    engine = Path(lora_studio.engine.__file__).parent
    writers = sorted(p.name for p in engine.glob("*.py") if "write_status(" in p.read_text())
    assert writers == ["run.py"]
    text = (engine / "run.py").read_text()
    assert text.count("rf.write_status(") == 2  # RunStatus.running and RunStatus.finish, nowhere else
