"""``/v1/files``: dataset uploads, referred to from a spec as ``upload:<id>``; each belongs to its uploader."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile

from posttrain.service.routes.deps import AUTH, Caller, find_file, owner_filter, settings_of, store_of
from posttrain.service.schemas import FileInfo
from posttrain.service.uploads import UploadTooLarge, file_info, save_upload

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=AUTH)


@router.post("", status_code=201, response_model=FileInfo)
def upload(file: Annotated[UploadFile, File(description="A dataset file (.jsonl, .json, .csv, .parquet).")],
           request: Request, caller: Caller) -> FileInfo:
    settings = settings_of(request)
    try:
        record = save_upload(file.file, file.filename, settings.files_dir, settings.max_upload_bytes,
                             store_of(request), caller.owner)
    except UploadTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    return file_info(record)


@router.get("", response_model=list[FileInfo])
def list_files(request: Request, caller: Caller,
               limit: Annotated[int, Query(ge=1, le=1000, description="Newest first, at most this many.")] = 1000
               ) -> list[FileInfo]:
    return [file_info(r) for r in store_of(request).list_files(owner_filter(caller), limit)]


@router.get("/{file_id}", response_model=FileInfo)
def get_file(file_id: str, request: Request, caller: Caller) -> FileInfo:
    return file_info(find_file(store_of(request), file_id, caller))


@router.delete("/{file_id}", status_code=204)
def delete_file(file_id: str, request: Request, caller: Caller) -> None:
    record = find_file(store_of(request), file_id, caller)
    folder = Path(record.path).parent
    if folder.resolve().is_relative_to(settings_of(request).files_dir):
        shutil.rmtree(folder, ignore_errors=True)
    store_of(request).delete_file(file_id)
