"""The README's examples work as typed from a fresh clone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_add_job_examples_name_files_that_exist():
    readme = (ROOT / "README.rst").read_text()
    files = re.findall(r"^\s+\.venv/bin/vfab add job \S+ (\S+)", readme, re.MULTILINE)
    assert files, "no `.venv/bin/vfab add job` example in the README"
    for name in files:
        assert (ROOT / name).is_file(), f"the README's example names {name}, not in the clone"
