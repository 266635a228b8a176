"""An image named in a request body: base64, a `data:` URI, or a URL on a host the operator allows.

The service fetches nothing by default. Only when `KOSMOS_ALLOWED_IMAGE_HOSTS` lists a URL's host is
it fetched: http(s) only, no redirects (they could lead to any host), within a timeout, and cut off
at the upload cap. `file:` URLs are always refused: a request never reads the server's own files.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection
from urllib.parse import urlsplit

import httpx

from kosmos_serve.errors import ImageFetchStatusError, InvalidImageError, PayloadTooLargeError

URL_SCHEMES = ("http://", "https://", "ftp://", "file:")


def decode_base64_image(data: str) -> bytes:
    """The bytes of a base64 image, optionally as a `data:` URI.

    >>> decode_base64_image("data:image/png;base64,aGk=")
    b'hi'
    """
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise InvalidImageError("A data: URI image must be base64-encoded (data:image/png;base64,...).")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError("The image is not valid base64.") from None


def is_url(reference: str) -> bool:
    """Whether `reference` names an image by URL rather than carrying its bytes."""
    return reference.lower().startswith(URL_SCHEMES)


async def image_bytes(reference: str, allowed_hosts: Collection[str], max_bytes: int, timeout: float) -> bytes:
    """The bytes `reference` carries or names; a URL is fetched only from an allowed host."""
    if not is_url(reference):
        return decode_base64_image(reference)
    return await fetch_image(reference, allowed_hosts, max_bytes, timeout)


async def fetch_image(url: str, allowed_hosts: Collection[str], max_bytes: int, timeout: float,
                      headers: dict[str, str] | None = None) -> bytes:
    """GET `url` from an allowed host, at most `max_bytes` of it, within `timeout` seconds."""
    check_fetchable(url, allowed_hosts)
    try:
        async with (httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client,
                    client.stream("GET", url, headers=headers) as response):
            if response.status_code != 200:
                raise ImageFetchStatusError(f"Fetching the image at {url} answered HTTP {response.status_code}.",
                                            response.status_code)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _too_large(url, max_bytes)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise _too_large(url, max_bytes)
            return bytes(body)
    except httpx.TimeoutException:
        raise InvalidImageError(f"Fetching the image at {url} took longer than {timeout:g} s.") from None
    except httpx.HTTPError as error:
        raise InvalidImageError(f"The image at {url} could not be fetched ({type(error).__name__}).") from None


def check_fetchable(url: str, allowed_hosts: Collection[str]) -> None:
    """Refuse, with a message saying how to send the image instead, any URL the service may not fetch.

    >>> check_fetchable("https://images.example.com/a.png", ["images.example.com"])
    >>> check_fetchable("https://elsewhere.example/a.png", ["images.example.com"])
    Traceback (most recent call last):
    ...
    kosmos_serve.errors.InvalidImageError: The service fetches no image from elsewhere.example: ...
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidImageError(
            f"The service never fetches {parts.scheme}: URLs; send the image's bytes (base64 or a data: URI)."
        )
    host = (parts.hostname or "").lower()
    allowed = {entry.lower() for entry in allowed_hosts}
    if host not in allowed and f"{host}:{parts.port}" not in allowed:
        listed = f"only from {', '.join(sorted(allowed))}" if allowed else "from no host"
        raise InvalidImageError(
            f"The service fetches no image from {host or 'that URL'}: it fetches images {listed} "
            "(KOSMOS_ALLOWED_IMAGE_HOSTS). Send the image's bytes instead (base64 or a data: URI)."
        )


def _too_large(url: str, max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The image at {url} is larger than the {max_bytes}-byte upload limit.")
