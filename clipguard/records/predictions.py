"""Per-image results (``--predictions FILE``): one row per image, so two models can be paired image by image
(McNemar) and other tools compared exactly. CSV, or Parquet when the file name ends in ``.parquet``.

Columns: ``index`` (position in the evaluated set), ``digest`` (sha256 of the image's uint8 bytes as loaded,
16 hex digits), ``label``, ``clean_pred``, then ``adv_pred@<eps>`` per eps of the sweep and ``robust@<eps>`` (1 when
the image counts as robust in the record's robust_acc: clean-correct and still correct under the attack, as the runner
judged it; with a randomized defense the clean pass it judged by is another draw than ``clean_pred``'s).
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from clipguard.fsutil import atomic_write, atomic_write_text, writing_output


def image_digests(images: torch.Tensor) -> list[str]:
    """Per image: sha256 of its bytes (uint8 (N, 3, H, W), contiguous, CPU), first 16 hex digits."""
    flat = images.contiguous().cpu().reshape(images.shape[0], -1).numpy()
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in flat]


def prediction_table(digests: list[str], labels: torch.Tensor, clean_pred: torch.Tensor,
                     adv_preds: dict[str, torch.Tensor], classnames: list[str] | None = None) -> dict[str, list]:
    """Column name -> values, in image order (``digests``: :func:`image_digests` of the images); with
    ``classnames`` each class column gets a ``_name`` twin, so the file reads without the prompts file."""
    cols = {"index": list(range(len(labels))), "digest": digests, "label": labels.tolist(),
            "clean_pred": clean_pred.tolist()}
    verdicts = [k for k in adv_preds if k.startswith("robust@")]  # the runner's own robust flags: 0 / 1 columns
    cols.update({f"adv_pred@{eps}": pred.tolist() for eps, pred in adv_preds.items() if eps not in verdicts})
    cols.update({k: [int(v) for v in adv_preds[k].tolist()] for k in verdicts})
    if classnames:
        cols.update({f"{k}_name" if "@" not in k else k.replace("@", "_name@"): [classnames[c] for c in v]
                     for k, v in list(cols.items()) if k == "label" or "pred" in k})
    return cols


def write_predictions(path: str | Path, table: dict[str, list]) -> Path | None:
    """Write the table atomically: Parquet for ``*.parquet``, else CSV. A write failure is one line; under a
    command that declared ``path`` it waits for the record (``fsutil.writing_output``) and None is returned."""
    with writing_output(path, "the predictions", hold=True):
        return _write_table(Path(path), table)
    return None


def _write_table(path: Path, table: dict[str, list]) -> Path:
    if path.suffix == ".parquet":
        return atomic_write(path, lambda tmp: pq.write_table(pa.table(table), tmp))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(table)
    writer.writerows(zip(*table.values(), strict=True))
    return atomic_write_text(path, buf.getvalue())
