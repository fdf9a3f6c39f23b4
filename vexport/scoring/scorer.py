"""Score one window of rows: encode, batch by token budget, run the model, and give one table row per input row.

The window table has every input row of the window, in row order: scored rows with ``value``, ``num_tokens``
(and ``values`` with per-token output), rejected rows with ``error``; ``slots`` is the padded width of the
batch a scored row ran in, from which the padding fraction follows. The sink splits the table into the part
file and errors.jsonl; both engines produce it with this same code.

A row whose values are not all finite (NaN or inf: broken weights, an overflow) is rejected with
NON_FINITE, never written as a score. A row whose token ids fall outside the model's vocabulary is rejected with
a reason containing OUTSIDE_VOCABULARY, which stops the run (commit.py): the tokenizer does not fit the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vexport.batching import (DEFAULT_BATCH_TOKENS, MIN_BATCH_FRACTION, MIN_LENGTH_RATIO, pad_batch, pad_id_of,
                               plan_batches, run_in_order, unpad)
from vexport.errors import VexportError
from vexport.scoring.rows import EncodedRow, RowEncoder

NON_FINITE = "non-finite value (NaN or inf)"
OUTSIDE_VOCABULARY = "outside the model's vocabulary"
ID_TYPES = {"int": "int64", "uint": "uint64", "str": "string"}  # the id column's Arrow type per InputPlan.id_kind
__all__ = ["MIN_BATCH_FRACTION", "MIN_LENGTH_RATIO", "ScorerOptions", "WindowScorer", "plan_batches", "window_schema"]


@dataclass(frozen=True)
class ScorerOptions:
    """What decides the numbers in a window table (everything but the model)."""

    max_length: int
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    per_token: bool = False
    append_eos: bool = False
    padding_side: str = "right"
    fixed_batch_rows: int | None = None  # baseline for benchmarks: batches of N rows in input order, unsorted


def window_schema(id_kind: str | None, per_token: bool):
    """Columns of a window table (see the module docstring)."""
    import pyarrow as pa

    fields = [pa.field("row", pa.int64(), nullable=False)]
    if id_kind:
        fields.append(pa.field("id", pa.type_for_alias(ID_TYPES[id_kind])))
    fields += [pa.field("value", pa.float32()), pa.field("num_tokens", pa.int32())]
    if per_token:
        fields.append(pa.field("values", pa.list_(pa.float32())))
    return pa.schema([*fields, pa.field("error", pa.string()), pa.field("slots", pa.int64())])


class WindowScorer:
    """A loaded ValueModel plus the options: ``scorer(start, lines)`` gives the window table."""

    def __init__(self, model: Any, options: ScorerOptions, id_kind: str | None = None):
        try:
            tokenizer = model.tokenizer
        except Exception as exc:  # transformers raises several types for missing or broken tokenizer files
            raise VexportError(f"{model.path}: its tokenizer does not load ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]})") from None
        self.model, self.options, self.id_kind = model, options, id_kind
        self.vocab_size = getattr(model.config, "vocab_size", None)
        self.encoder = RowEncoder(tokenizer, options.max_length, options.append_eos, id_kind)
        self.pad_id = pad_id_of(model)  # the mask decides what is padding, never the pad id

    def __call__(self, start: int, lines: Sequence[bytes | None]):
        rows = [self._in_vocabulary(r) for r in self.encoder.encode(lines)]
        scored = [i for i, r in enumerate(rows) if isinstance(r, EncodedRow)]
        values, slots = self.values([rows[i].ids for i in scored])
        results = {}
        for i, row_values, width in zip(scored, values, slots):
            if np.isfinite(row_values).all():
                results[i] = (row_values, width)
            else:
                rows[i] = NON_FINITE
        return self._table(start, rows, results)

    def _in_vocabulary(self, row: EncodedRow | str) -> EncodedRow | str:
        if not isinstance(row, EncodedRow) or not self.vocab_size:
            return row
        low, high = min(row.ids), max(row.ids)
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            return (f"token id {bad} is {OUTSIDE_VOCABULARY} [0, {self.vocab_size}): the tokenizer in "
                    f"{self.model.path} does not fit the model's weights")
        return row

    @torch.inference_mode()
    def values(self, sequences: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], list[int]]:
        """Per-token values of each sequence (float32, unpadded) and the padded width it was computed at."""
        def run(_: int, batch: Sequence[int]) -> list[tuple[np.ndarray, int]]:
            ids, mask = pad_batch([sequences[i] for i in batch], self.pad_id, self.options.padding_side)
            return [(row, ids.shape[1]) for row in unpad(self.model.values(ids, mask), mask)]

        batches = plan_batches([len(s) for s in sequences], self.options.batch_tokens, self.options.fixed_batch_rows)
        scored = run_in_order(batches, len(sequences), run)
        return [values for values, _ in scored], [width for _, width in scored]

    def _table(self, start: int, rows: list, results: dict):
        import pyarrow as pa

        columns: dict[str, list] = {"row": list(range(start, start + len(rows)))}
        if self.id_kind:
            columns["id"] = [r.id if isinstance(r, EncodedRow) else None for r in rows]
        got = [results.get(i) for i in range(len(rows))]
        columns["value"] = [None if g is None else float(g[0][-1]) for g in got]
        columns["num_tokens"] = [None if g is None else len(g[0]) for g in got]
        if self.options.per_token:
            columns["values"] = [None if g is None else g[0] for g in got]
        columns["error"] = [r if isinstance(r, str) else None for r in rows]
        columns["slots"] = [None if g is None else g[1] for g in got]
        return pa.table(columns, schema=window_schema(self.id_kind, self.options.per_token))
