"""Read an offline W&B run's ``run-*.wandb`` record log without a server, checking every record.

The file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by the leveldb log
format: 32 KiB blocks of records, each with a 7-byte header (CRC-32 little-endian, payload
length as 2 bytes little-endian, fragment type) and a payload; a record that does not fit a
block is split into FIRST/MIDDLE/LAST fragments. wandb's checksum is the plain CRC-32 of
zlib (IEEE polynomial, not leveldb's masked CRC-32C) over the type byte and the payload; this
was checked against files written by wandb 0.31. A torn or corrupt record is skipped with a
warning naming the file and its byte offset, never parsed.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

WANDB_TESTED = ("0.31",)
MAGIC, MAGIC_VERSION, LOG_VERSION = b":W&B", 0xBEE1, 0
BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_offline_files(run_dir: str | os.PathLike) -> list[Path]:
    """The ``run-*.wandb`` record logs under a run folder (or a W&B ``offline-run-*`` folder)."""
    return sorted(Path(run_dir).glob("**/offline-run-*/run-*.wandb")) or sorted(
        Path(run_dir).glob("run-*.wandb"))


def record_crc(kind: int, payload: bytes) -> int:
    """The checksum wandb writes in a record header: CRC-32 of the type byte and the payload."""
    return zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF


def wandb_records(path: str | os.PathLike) -> Iterator[bytes]:
    """Payloads of the intact records of a W&B record log; broken ones are logged and skipped."""
    path = Path(path)
    data = path.read_bytes()
    if (len(data) < HEADER or data[:4] != MAGIC
            or int.from_bytes(data[4:6], "little") != MAGIC_VERSION or data[6] != LOG_VERSION):
        raise ValueError(f"{path} is not a W&B record log (bad file header)")
    pos, pending, start, dropping = HEADER, None, 0, False
    while pos < len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        if pos + HEADER > len(data):
            logger.warning("%s: torn record header at byte %d (the file ends); skipped", path, pos)
            break
        crc = int.from_bytes(data[pos:pos + 4], "little")
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        if crc == 0 and length == 0 and kind == 0:
            pos += HEADER
            continue
        end = pos + HEADER + length
        if end > len(data):
            logger.warning("%s: torn record at byte %d (%d payload bytes, the file ends after "
                           "%d); skipped", path, pos, length, len(data) - pos - HEADER)
            pending = None
            break
        if length > left - HEADER:
            logger.warning("%s: corrupt record at byte %d (length %d runs past its block); "
                           "skipped the rest of the block", path, pos, length)
            pos, pending, dropping = pos + left, None, True
            continue
        payload = data[pos + HEADER:end]
        if record_crc(kind, payload) != crc:
            logger.warning("%s: corrupt record at byte %d (checksum mismatch); skipped",
                           path, start if pending is not None else pos)
            pos, pending, dropping = end, None, True
            continue
        if kind in (FULL, FIRST):
            if pending is not None:
                logger.warning("%s: incomplete record at byte %d (no last fragment); skipped",
                               path, start)
            dropping = False
            if kind == FULL:
                pending = None
                yield payload
            else:
                pending, start = payload, pos
        elif kind in (MIDDLE, LAST):
            if pending is None:
                if not dropping:
                    logger.warning("%s: record fragment at byte %d without its first "
                                   "fragment; skipped", path, pos)
                dropping = kind == MIDDLE
            elif kind == MIDDLE:
                pending += payload
            else:
                yield pending + payload
                pending = None
        else:
            logger.warning("%s: record of unknown type %d at byte %d; skipped", path, kind, pos)
        pos = end
    if pending is not None:
        logger.warning("%s: incomplete record at byte %d (the file ends before its last "
                       "fragment); skipped", path, start)


def read_wandb_offline(path: str | os.PathLike) -> dict:
    """Config, history rows, summary and exit code of an offline W&B run, read without a server."""
    import wandb
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    if not wandb.__version__.startswith(WANDB_TESTED):
        raise RuntimeError(f"reading offline W&B runs is tested with wandb {WANDB_TESTED}, "
                           f"not {wandb.__version__}; read the run folder's metrics.jsonl instead")
    files = wandb_offline_files(path)
    if not files:
        raise FileNotFoundError(f"no offline W&B run (run-*.wandb) under {path}")
    config: dict = {}
    history: list[dict] = []
    summary: dict = {}
    exit_code: int | None = None
    for file in files:
        for payload in wandb_records(file):
            try:
                record = wandb_internal_pb2.Record.FromString(payload)
            except DecodeError as err:
                logger.warning("%s: a record with a valid checksum does not decode (%s); "
                               "skipped", file, err)
                continue
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append(_items(record.history.item))
            elif kind == "summary":
                summary.update(_items(record.summary.update))
            elif kind == "exit":
                exit_code = record.exit.exit_code
            elif kind in ("run", "config"):
                items = record.run.config.update if kind == "run" else record.config.update
                config.update(_items(items))
    return {"config": config, "history": history, "summary": summary, "exit_code": exit_code}


def _items(items: Iterable) -> dict:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out
