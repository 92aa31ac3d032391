"""Writing OpenAI Batch output files: ``.jsonl`` files holding only the ``line`` column, one line each.

Built on Ray Data's block-based file datasink (as ``write_parquet`` is), so it is a ``Write`` of a
``_FileDatasink``: with ``DataContext.checkpoint_config`` set, Ray Data's row-level checkpointing applies unchanged
(a pending checkpoint of the block's id column before the file is written, committed after; on resume, files of
uncommitted checkpoints are deleted and checkpointed ids filtered at the read). The blocks given to the sink must
therefore still carry the id column; only the line column reaches the file.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink

_LINES_PER_WRITE = 4096


class JsonlLinesDatasink(BlockBasedFileDatasink):
    """Writes the ``line_column`` of each block as UTF-8 text, one value per line (``\\n``-terminated), to
    ``<path>/<write uuid>_<task>.jsonl`` files. ``filesystem`` is a pyarrow filesystem and ``min_rows_per_file``
    buffers rows per file, as for ``Dataset.write_parquet``. Use with ``Dataset.write_datasink``."""

    def __init__(self, path: str, *, filesystem: pafs.FileSystem | None = None,
                 min_rows_per_file: int | None = None, line_column: str = "line", **file_datasink_kwargs: Any):
        super().__init__(path, filesystem=filesystem, min_rows_per_file=min_rows_per_file, file_format="jsonl",
                         **file_datasink_kwargs)
        self.line_column = line_column

    def write_block_to_file(self, block: BlockAccessor, file: pa.NativeFile) -> None:
        table = block.to_arrow()
        if self.line_column not in table.column_names:
            raise ValueError(f"column {self.line_column!r} is not in the block to write ({table.column_names})")
        lines = table[self.line_column]
        if lines.null_count:
            raise ValueError(f"column {self.line_column!r} has {lines.null_count} null value(s); every row must "
                             "have its output line")
        if pc.any(pc.match_substring(lines, "\n")).as_py():
            raise ValueError(f"column {self.line_column!r} has a value with a newline: it would split the line")
        values = lines.to_pylist()
        for i in range(0, len(values), _LINES_PER_WRITE):
            file.write(("\n".join(values[i:i + _LINES_PER_WRITE]) + "\n").encode("utf-8"))
