"""``/v1/files``: dataset uploads, referred to from a spec as ``upload:<id>``; each belongs to its uploader.

The shapes are OpenAI's files API (upload with ``purpose``, cursor-paged list, deletion object, content)
with posttrain's fields beside them, so OpenAI's SDK and posttrain's client both read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse

from posttrain.data.openai_files import check_fine_tuning_file
from posttrain.errors import DatasetError
from posttrain.service.errors import InvalidRequest
from posttrain.service.routes.deps import AUTH, Caller, find_file, owner_filter, settings_of, store_of
from posttrain.service.schemas import RESULTS_PREFIX, FileDeleted, FileInfo, FileList
from posttrain.service.uploads import UploadTooLarge, delete_upload, file_info, save_upload

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=AUTH)
PURPOSE = "fine-tune"
RESULTS_PURPOSE = "fine-tune-results"  # a job's results file (its id starts with RESULTS_PREFIX)


@router.post("", status_code=201, response_model=FileInfo)
def upload(file: Annotated[UploadFile, File(description="A dataset file (.jsonl, .json, .csv, .parquet).")],
           request: Request, caller: Caller,
           purpose: Annotated[str | None, Form(description="'fine-tune' (what OpenAI's SDK sends): a .jsonl "
                                                           "file is then checked line by line against "
                                                           "OpenAI's fine-tuning formats.")] = None,
           ) -> FileInfo:
    if purpose is not None and purpose != PURPOSE:
        raise InvalidRequest(f"purpose {purpose!r} is not supported: this server keeps files for fine-tuning "
                             f"only (purpose {PURPOSE!r})", param="purpose")
    settings = settings_of(request)
    store = store_of(request)
    try:
        record = save_upload(file.file, file.filename, settings.files_dir, settings.max_upload_bytes,
                             store, caller.owner)
    except UploadTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    if purpose is not None and record.filename.lower().endswith(".jsonl"):
        try:
            check_fine_tuning_file(settings.files_dir / record.id / record.filename, record.filename)
        except DatasetError as exc:
            delete_upload(record, settings.files_dir, store)  # a file that cannot train is not kept
            raise InvalidRequest(f"invalid fine-tuning file {exc.message}", param="file",
                                 code="invalid_file_format") from None
    return file_info(record)


@router.get("", response_model=FileList)
def list_files(request: Request, caller: Caller,
               limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many files.")] = 10_000,
               after: Annotated[str | None, Query(max_length=64, description="The last id of the previous page.")]
               = None,
               order: Annotated[Literal["asc", "desc"], Query(description="By creation time.")] = "desc",
               purpose: Annotated[str | None, Query(max_length=64, description="Only files of this purpose.")] = None,
               ) -> FileList:
    # The purpose is filtered in the query, before the limit: a page must not come back empty while
    # files of that purpose remain (OpenAI's SDK stops paging at an empty page).
    kinds = {} if purpose is None else (
        {"id_prefix": RESULTS_PREFIX} if purpose == RESULTS_PURPOSE else {"not_id_prefix": RESULTS_PREFIX})
    if purpose not in (None, PURPOSE, RESULTS_PURPOSE):
        return FileList(data=[], has_more=False, first_id=None, last_id=None)
    records = store_of(request).list_files(owner_filter(caller), limit + 1, after, oldest_first=order == "asc",
                                           **kinds)
    data = [file_info(record) for record in records[:limit]]
    return FileList(data=data, has_more=len(records) > limit, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/{file_id}", response_model=FileInfo)
def get_file(file_id: str, request: Request, caller: Caller) -> FileInfo:
    return file_info(find_file(store_of(request), file_id, caller))


@router.get("/{file_id}/content", responses={200: {"content": {"application/octet-stream": {}}}})
def file_content(file_id: str, request: Request, caller: Caller) -> FileResponse:
    record = find_file(store_of(request), file_id, caller)
    if not Path(record.path).is_file():
        raise HTTPException(404, f"uploaded file {file_id!r} has no content on this server any more")
    return FileResponse(record.path, filename=record.filename, media_type="application/octet-stream")


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, request: Request, caller: Caller) -> FileDeleted:
    record = find_file(store_of(request), file_id, caller)
    delete_upload(record, settings_of(request).files_dir, store_of(request))
    return FileDeleted(id=file_id)
