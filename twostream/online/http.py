"""HTTP request handling of the endpoint, without a web framework: :class:`ApiError` (status,
code, reason), accepted media types, body size limits (declared and streamed), multipart
parsing, the source id, the admin bearer check, the status of a decode failure, image ids."""

from __future__ import annotations

import email.parser
import email.policy
import hmac
import re
import uuid
from collections.abc import AsyncIterable, Mapping
from typing import Literal

from twostream.core.config import ADMIN_TOKEN_ENV, ServeSettings


class ApiError(Exception):
    """An error answer: HTTP status, a code and a reason (rendered as :class:`ErrorResponse`)."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


RAW_MEDIA_TYPES = frozenset(
    {
        "application/octet-stream",
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
    }
)
MULTIPART = "multipart/form-data"
IMAGE_FIELDS = ("image", "file")
SOURCE_FIELD = "source"
_SOURCE_RE = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no spaces, 1-256 chars


def media_kind(content_type: str | None) -> Literal["raw", "multipart"]:
    """``raw`` (the body is the image) or ``multipart``; anything else is a 415."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime == MULTIPART:
        return "multipart"
    if mime in RAW_MEDIA_TYPES:
        return "raw"
    shown = mime or "none"
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {shown!r} is not accepted: send the image as the raw body "
        f"(image/jpeg, image/png, image/webp, image/gif, image/bmp, image/tiff or "
        f"application/octet-stream) or as field 'image' of multipart/form-data",
    )


def check_content_length(value: str | None, limit: int) -> None:
    """413 as soon as a declared length is over the limit (before reading the body)."""
    if value is None:
        return
    try:
        length = int(value)
    except ValueError:
        raise ApiError(400, "bad_request", f"invalid Content-Length {value!r}") from None
    if length > limit:
        raise too_large(length, limit)


def too_large(length: int | None, limit: int) -> ApiError:
    """The 413 for a body of ``length`` bytes (None: more than the limit, found while reading)."""
    got = f"{length} bytes" if length is not None else "more"
    return ApiError(413, "payload_too_large", f"request body is {got}; the limit is {limit} bytes")


async def read_limited(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """Join an async iterator of byte chunks, failing with 413 once past ``limit``."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(None, limit)
        parts.append(chunk)
    return b"".join(parts)


def parse_multipart(body: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    """The image part (field ``image`` or ``file``) and the text fields of a form upload."""
    if "boundary=" not in content_type:
        raise ApiError(400, "bad_request", "multipart/form-data without a boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, "bad_request", "malformed multipart/form-data body")
    image: bytes | None = None
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if name in IMAGE_FIELDS and image is None:
            image = payload
        elif part.get_filename() is None:
            fields[name] = payload.decode("utf-8", errors="replace")
    if image is None:
        raise ApiError(
            400, "missing_image", "multipart/form-data upload without an 'image' (or 'file') field"
        )
    return image, fields


def resolve_source(
    header_value: str | None,
    field_value: str | None,
    client_host: str | None,
    trust_client_value: bool = True,
) -> str:
    """The source id: the header, else the form field, else the client address.

    An empty or malformed explicit value is a 400 (never silently replaced); no value and no
    client address is a 400 too.
    """
    for given, where in ((header_value, "header"), (field_value, "field")):
        if given is None or not trust_client_value:
            continue
        if not _SOURCE_RE.match(given):
            raise ApiError(
                400,
                "bad_source",
                f"source id from the {where} must be 1-256 printable ASCII characters without spaces",
            )
        return given
    if client_host:
        return client_host
    raise ApiError(400, "missing_source", "no source id given and the client address is unknown")


async def read_upload(
    headers: Mapping[str, str], chunks: AsyncIterable[bytes], client_host: str | None, settings: ServeSettings
) -> tuple[bytes, str]:
    """The image bytes and the source id of a classify request: media type, body limits, the
    multipart form if any, the source (header, form field, client address)."""
    content_type = headers.get("content-type", "")
    kind = media_kind(content_type)
    check_content_length(headers.get("content-length"), settings.max_body_bytes)
    data = await read_limited(chunks, settings.max_body_bytes)
    fields: dict[str, str] = {}
    if kind == "multipart":
        data, fields = parse_multipart(data, content_type)
    source = resolve_source(
        headers.get(settings.source_header), fields.get(SOURCE_FIELD), client_host, settings.trust_source_header
    )
    return data, source


def check_bearer(authorization: str | None, token: str | None) -> None:
    """401 without credentials, 403 with wrong ones or when admin routes are disabled."""
    if not token:
        raise ApiError(403, "admin_disabled", f"admin routes are disabled: set serve.admin_token or ${ADMIN_TOKEN_ENV}")
    if not authorization:
        raise ApiError(
            401, "unauthorized", "admin route: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(
            401, "unauthorized", "admin route: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(403, "forbidden", "invalid admin token")


def decode_error_status(reason: str) -> ApiError:
    """A decode failure: 415 for a recognised but unsupported format, otherwise 422."""
    if reason.startswith("unsupported image format"):
        return ApiError(415, "unsupported_image_format", reason)
    return ApiError(422, "undecodable_image", reason)


def new_image_id() -> str:
    """A fresh random image id (32 hex digits)."""
    return uuid.uuid4().hex
