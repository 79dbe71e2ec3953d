"""Uploaded dataset files: stored under ``<data dir>/files/<id>/<name>``, referred to as ``upload:<id>``."""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path
from typing import BinaryIO

from posttrain.errors import ConfigError
from posttrain.job_paths import path_fields, set_path_field
from posttrain.service.ids import is_id, new_file_id
from posttrain.service.schemas import RESULTS_PREFIX, UPLOAD_PREFIX, FileInfo
from posttrain.service.store import FileRecord, JobStore
from posttrain.spec import JobSpec

# The spec's fields that name data files (an ``upload:<id>`` may stand for any of them).
DATA_FIELDS = ("data.source", "data.validation.source", "eval.data", "eval.regression")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"upload is larger than this server's limit of {limit} bytes")
        self.limit = limit


def safe_filename(name: str | None) -> str:
    """Keep the extension (the data loader reads the format from it) but nothing path-like."""
    base = _UNSAFE.sub("_", Path(name or "").name).strip("._")[:128]
    return base or "data"


def save_upload(source: BinaryIO, filename: str | None, files_dir: Path, limit: int, store: JobStore,
                owner: str) -> FileRecord:
    file_id = new_file_id()
    folder = files_dir / file_id
    folder.mkdir(parents=True)
    target = folder / safe_filename(filename)
    digest = hashlib.sha256()
    size = 0
    try:
        with open(target, "wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise UploadTooLarge(limit)
                digest.update(chunk)
                out.write(chunk)
        record = FileRecord(id=file_id, owner=owner, filename=target.name, path=str(target), size=size,
                            sha256=digest.hexdigest(), created_at=time.time())
        return store.add_file(record)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def file_info(record: FileRecord) -> FileInfo:
    purpose = "fine-tune-results" if record.id.startswith(RESULTS_PREFIX) else "fine-tune"
    return FileInfo(id=record.id, filename=record.filename, bytes=record.size, size=record.size, purpose=purpose,
                    sha256=record.sha256, created_at=int(record.created_at), source=UPLOAD_PREFIX + record.id)


def delete_upload(record: FileRecord, files_dir: Path, store: JobStore) -> None:
    folder = Path(record.path).parent
    if folder.resolve().is_relative_to(files_dir):  # never delete outside our own data dir
        shutil.rmtree(folder, ignore_errors=True)
    store.delete_file(record.id)


def resolve_upload_references(spec: JobSpec, store: JobStore, owner: str | None) -> None:
    """Replace ``upload:<id>`` data sources with the stored file's path on this server; with ``owner``,
    only that owner's uploads are found."""

    def resolve(value: str, key: str) -> str:
        file_id = value[len(UPLOAD_PREFIX):]
        record = store.get_owned_file(file_id, owner) if is_id(file_id) else None
        if record is None or not Path(record.path).is_file():
            raise ConfigError(f"no uploaded file {file_id!r} on this server (upload it with POST /v1/files)", key)
        return record.path

    for key, value in path_fields(spec).items():
        if key in DATA_FIELDS and value is not None and value.startswith(UPLOAD_PREFIX):
            set_path_field(spec, key, resolve(value, key))
