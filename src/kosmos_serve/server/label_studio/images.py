"""The images of Label Studio tasks: `data:` URIs, local files under the document root, and Label Studio's own
uploads and local-files URLs fetched from Label Studio (and no other host) with its token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import posixpath
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import httpx

from kosmos_serve.config import ServerSettings
from kosmos_serve.errors import ImageFetchStatusError, InvalidImageError, InvalidRequestError, PayloadTooLargeError
from kosmos_serve.server.image_sources import decode_base64_image, fetch_image

CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")


def image_source(reference: str) -> Literal["data", "label_studio", "local_files", "url", "cloud", "unknown"]:
    """What kind of image reference a task holds.

    >>> [image_source(r) for r in ["data:image/png;base64,aGk=", "/data/upload/1/a.png",
    ...  "/data/local-files/?d=img/a.png", "http://ls:8080/data/upload/1/a.png", "s3://bucket/a.png", "a.png"]]
    ['data', 'label_studio', 'local_files', 'url', 'cloud', 'unknown']
    """
    lowered = reference.lower()
    if lowered.startswith("data:"):
        return "data"
    if lowered.startswith(CLOUD_SCHEMES):
        return "cloud"
    if lowered.startswith(("http://", "https://")):
        return "url"
    if reference.startswith("/data/local-files") and "d=" in urlsplit(reference).query:
        return "local_files"
    if reference.startswith(("/data/", "/upload/", "upload/")):
        return "label_studio"
    return "unknown"


def local_file_path(reference: str, root: str) -> Path:
    """The file a `/data/local-files/?d=...` URL names under `root`, as Label Studio resolves it; never outside.

    >>> str(local_file_path("/data/local-files/?d=scenes/a.png", "/srv/images"))
    '/srv/images/scenes/a.png'
    >>> local_file_path("/data/local-files/?d=../../etc/passwd", "/srv/images")
    Traceback (most recent call last):
    ...
    kosmos_serve.errors.InvalidImageError: The local file ../../etc/passwd lies outside the document root ...
    """
    values = parse_qs(urlsplit(reference).query, keep_blank_values=True).get("d")
    relative = values[-1] if values else ""
    if not relative:
        raise InvalidImageError(f"The local-files URL {reference} names no file (?d=path/to/image.png).")
    base = os.path.abspath(root)
    path = os.path.abspath(os.path.join(base, posixpath.normpath(relative).lstrip("/")))
    if os.path.commonpath([path, base]) != base:
        raise InvalidImageError(f"The local file {relative} lies outside the document root (Label Studio's local "
                                f"files are relative to it).")
    return Path(path)


async def task_image_bytes(reference: Any, settings: ServerSettings, field: str) -> bytes:
    """The bytes of a task's image: decoded, read under the document root, or fetched from Label Studio only."""
    if not isinstance(reference, str) or not reference.strip():
        raise InvalidRequestError(f"data.{field} must be the image's URL or data: URI (the labeling config's <Image> "
                                  f"reads ${field}); got {type(reference).__name__}.")
    source = image_source(reference)
    if source == "data":
        return decode_base64_image(reference)
    if source == "local_files":
        local_file_path(reference, "/root-of-the-check")  # a path that leaves the root is never read nor fetched
        root = settings.label_studio_local_files_document_root
        if root and os.path.abspath(root) != os.path.abspath(os.sep):  # "/" would make every file readable
            path = local_file_path(reference, root)
            if path.is_file():
                return await asyncio.to_thread(_read_file, path, settings.max_upload_bytes)
            if not settings.label_studio_url:
                raise InvalidImageError(f"The local file {path} does not exist "
                                        "(LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT).")
    if source in ("local_files", "label_studio", "url"):
        return await _fetch_from_label_studio(reference, settings)
    if source == "cloud":
        raise InvalidImageError(f"The image {reference} is in cloud storage, which this backend does not fetch; serve "
                                f"it through Label Studio (local files or uploads) or send it as a data: URI.")
    raise InvalidImageError(f"data.{field} {reference[:80]!r} is neither a data: URI nor a Label Studio upload or "
                            f"local-files URL.")


def _read_file(path: Path, max_bytes: int) -> bytes:
    if path.stat().st_size > max_bytes:
        raise PayloadTooLargeError(f"The local file {path} is larger than the {max_bytes}-byte upload limit.")
    return path.read_bytes()


async def _fetch_from_label_studio(reference: str, settings: ServerSettings) -> bytes:
    base = settings.label_studio_url
    own = urlsplit(base or "")
    if image_source(reference) == "url":
        parts = urlsplit(reference)
        if not base or (parts.scheme.lower(), parts.netloc.lower()) != (own.scheme.lower(), own.netloc.lower()):
            raise InvalidImageError(f"The image {reference[:200]} is not on Label Studio "
                                    f"({base or 'LABEL_STUDIO_URL is not set'}); this service fetches task images from "
                                    f"Label Studio only. Import the image into Label Studio or send it as a data: URI.")
        url = reference
    elif not base:
        raise InvalidImageError(f"The image {reference[:200]} is served by Label Studio; set LABEL_STUDIO_URL (and "
                                f"LABEL_STUDIO_API_KEY) so this service can fetch it from there.")
    else:
        path = reference.lstrip("/")
        url = f"{base}/data/{path}" if path.startswith("upload/") else f"{base}/{path}"  # upload/...: old tasks
    headers = await _authorization(settings)
    try:
        return await fetch_image(url, [own.netloc.lower()], settings.max_upload_bytes, settings.image_fetch_timeout_s,
                                 headers=headers)
    except ImageFetchStatusError as error:
        if error.http_status in (401, 403):
            error.message += (" Set LABEL_STUDIO_API_KEY to a Label Studio token."
                              if settings.label_studio_api_key is None
                              else " Label Studio refused LABEL_STUDIO_API_KEY (a legacy token works only where the "
                                   "organization allows legacy tokens; a personal access token always does).")
        raise


# Personal access tokens (JWT refresh tokens) are exchanged for short-lived access tokens, as the SDK does.
_access_tokens: dict[tuple[str, str], tuple[str, float]] = {}


async def _authorization(settings: ServerSettings) -> dict[str, str]:
    if settings.label_studio_api_key is None:
        return {}
    key = settings.label_studio_api_key.get_secret_value()
    if _jwt_expiry(key) is None:
        return {"Authorization": f"Token {key}"}  # a legacy token
    cached = _access_tokens.get((settings.label_studio_url, key))
    if cached is None or cached[1] < time.time() + 30:
        cached = await _refresh(settings.label_studio_url, key, settings.image_fetch_timeout_s)
        _access_tokens[(settings.label_studio_url, key)] = cached
    return {"Authorization": f"Bearer {cached[0]}"}


async def _refresh(base: str, refresh_token: str, timeout: float) -> tuple[str, float]:
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            answer = await client.post(f"{base}/api/token/refresh/", json={"refresh": refresh_token})
        access = answer.json().get("access") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        access = None
        answer = None
    if not isinstance(access, str):
        status = f"HTTP {answer.status_code}" if answer is not None else "no answer"
        raise InvalidImageError(f"Label Studio refused LABEL_STUDIO_API_KEY, a personal access token, when asked for "
                                f"an access token ({status}); check the token in Label Studio's Account & Settings.")
    return access, _jwt_expiry(access) or time.time() + 60


def _jwt_expiry(token: str) -> float | None:
    """The `exp` of a JSON web token, or None when `token` is not one (a legacy Label Studio token)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return float(payload.get("exp", time.time() + 60))
    except (binascii.Error, ValueError, TypeError, AttributeError):
        return None

