"""Writing the science commands' tables: one CSV writer for every command, local or gs://."""

from __future__ import annotations

import csv
import io
from typing import Iterable, Sequence


def write_csv(path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """A CSV at `path` (an etils/pathlib path, local or gs://): the header, then the rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue())
