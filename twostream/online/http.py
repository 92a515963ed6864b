"""HTTP request handling of the endpoint: :class:`ApiError` (status, code, reason), accepted
media types, body size limits (declared and streamed), the body's read deadline, the multipart
form (:class:`FormReader`, python-multipart's streaming parser with limits on parts, fields and
part headers), the source id (from the request, or looked up), the admin bearer check, the
status of a decode failure, image ids.

Nothing here holds anything past its request: a request that breaks off (client gone, deadline,
a limit) leaves no state behind, and the per-source state is only touched once an image is scored.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
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
MAX_SOURCE_CHARS = 256
_SOURCE_RE = re.compile(r"^[\x21-\x7e]{1,%d}$" % MAX_SOURCE_CHARS)  # printable ASCII, no spaces


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


async def limited(chunks: AsyncIterable[bytes], limit: int) -> AsyncIterator[bytes]:
    """The chunks of a body, failing with 413 as soon as they add up to more than ``limit``."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(None, limit)
        yield chunk


async def read_limited(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """Join an async iterator of byte chunks, failing with 413 once past ``limit``."""
    return b"".join([chunk async for chunk in limited(chunks, limit)])


FEED_SLICE = 64 * 1024  # parse at most this much before yielding to the event loop


class FormReader:
    """A ``multipart/form-data`` body parsed as it streams in, within limits: at most
    ``max_form_parts`` parts, ``max_form_field_bytes`` per text field, python-multipart's limits
    on each part's header lines (``max_part_header_bytes``, 8 headers). The image is the first
    part named ``image`` (or ``file``); other file parts are skipped. A limit or malformed input
    is a 400 as soon as it is seen, before the rest of the body is read."""

    def __init__(self, content_type: str, settings: ServeSettings) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise ApiError(400, "bad_request", "multipart/form-data without a boundary")
        self.settings = settings
        self.parse_options_header = parse_options_header
        self.parts = 0
        self.image: list[bytes] | None = None
        self.fields: dict[str, str] = {}
        self._header = bytearray()
        self._value = bytearray()
        self._disposition = b""
        self._name = ""
        self._sink: list[bytes] | bytearray | None = None
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        try:
            self.parser = MultipartParser(boundary, callbacks, max_header_size=settings.max_part_header_bytes)
        except ValueError as exc:  # python-multipart's FormParserError: e.g. a boundary too long
            raise ApiError(400, "bad_request", f"malformed multipart/form-data: {exc}") from None

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.settings.max_form_parts:
            raise ApiError(400, "too_many_parts", f"more than {self.settings.max_form_parts} form parts")
        self._disposition = b""
        self._sink = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._header.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = self.parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", errors="replace")
        self._name = name
        if name in IMAGE_FIELDS:
            if self.image is not None:
                raise ApiError(400, "duplicate_image", "more than one image part ('image' or 'file') in the "
                               "form: one upload is one image")
            self.image = self._sink = []
        elif b"filename" not in options and name:
            self._sink = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if isinstance(self._sink, list):
            self._sink.append(data[start:end])
        elif self._sink is not None:
            self._sink += data[start:end]
            if len(self._sink) > self.settings.max_form_field_bytes:
                raise ApiError(
                    400, "field_too_large",
                    f"form field {self._name[:64]!r} is over {self.settings.max_form_field_bytes} bytes",
                )

    def _part_end(self) -> None:
        if isinstance(self._sink, bytearray):
            value = self._sink.decode("utf-8", errors="replace")
            if self._name == SOURCE_FIELD and self._name in self.fields:  # never the first or the last of two
                raise ApiError(400, "duplicate_field", f"form field {self._name!r} given twice: "
                               f"{self.fields[self._name][:64]!r} and {value[:64]!r}: a request names one source")
            self.fields[self._name] = value
        self._sink = None

    async def feed(self, chunk: bytes) -> None:
        """Parse one chunk of the body, yielding to the event loop between slices."""
        from python_multipart.exceptions import FormParserError

        for start in range(0, len(chunk), FEED_SLICE):
            if start:
                await asyncio.sleep(0)
            try:
                self.parser.write(chunk[start : start + FEED_SLICE])
            except FormParserError as exc:
                raise ApiError(400, "bad_request", f"malformed multipart/form-data body: {exc}") from None

    def result(self) -> tuple[bytes, dict[str, str]]:
        """The image part and the text fields, once the whole body was fed."""
        from python_multipart.multipart import MultipartState

        if self.parser.state not in (MultipartState.END, MultipartState.BOUNDARY_PADDING) and self.parts:
            raise ApiError(400, "bad_request", "multipart/form-data body ended before its closing boundary")
        if self.image is None:
            raise ApiError(
                400, "missing_image", "multipart/form-data upload without an 'image' (or 'file') field"
            )
        return b"".join(self.image), self.fields


async def parse_multipart(body: bytes, content_type: str, settings: ServeSettings) -> tuple[bytes, dict[str, str]]:
    """The image part and the text fields of a whole form body (:class:`FormReader`)."""
    form = FormReader(content_type, settings)
    await form.feed(body)
    return form.result()


def resolve_source(
    header: str | Sequence[str] | None,
    field_value: str | None,
    client_host: str | None,
    trust_client_value: bool = True,
    header_name: str = "X-Source-Id",
) -> str:
    """The source id: the header, else the form field, else the client address.

    An empty or malformed explicit value is a 400 (never silently replaced); so are two source
    headers, or a header and a field that disagree (an upload names one identity: which of two
    was meant is not guessed); a header and a field with the same value are that value. No value
    and no client address is a 400 too. ``header``: its value, or every value it was given with.
    """
    header_values = [] if header is None else [header] if isinstance(header, str) else list(header)
    if trust_client_value:
        if len(header_values) > 1:
            shown = " and ".join(repr(v[:64]) for v in header_values[:4])
            raise ApiError(400, "ambiguous_source", f"{len(header_values)} {header_name} headers ({shown}): "
                           "a request names one source")
        header_value = header_values[0] if header_values else None
        if header_value is not None and field_value is not None and header_value != field_value:
            raise ApiError(400, "ambiguous_source", f"the {header_name} header names {header_value[:64]!r} and "
                           f"the form field '{SOURCE_FIELD}' names {field_value[:64]!r}: a request names one source")
        for given, where in ((header_value, "header"), (field_value, "field")):
            if given is None:
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
    raise ApiError(400, "missing_source", "no source id given (the source header or the form field "
                   "'source') and the client address is not known here (behind HAProxy it never is)")


def header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of header ``name`` (Starlette's ``getlist``; a plain mapping has at most one)."""
    getlist = getattr(headers, "getlist", None)
    if getlist is not None:
        return list(getlist(name))
    value = headers.get(name)
    return [] if value is None else [value]


async def read_upload(
    headers: Mapping[str, str], chunks: AsyncIterable[bytes], client_host: str | None, settings: ServeSettings
) -> tuple[bytes, str]:
    """The image bytes and the source id of a classify request: media type, body limits, the
    body's deadline (``serve.body_timeout_s``: 408), the multipart form if any (parsed as it
    arrives), the source (header, form field, client address)."""
    content_type = headers.get("content-type", "")
    kind = media_kind(content_type)
    check_content_length(headers.get("content-length"), settings.max_body_bytes)
    fields: dict[str, str] = {}
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            if kind == "multipart":
                form = FormReader(content_type, settings)
                async for chunk in limited(chunks, settings.max_body_bytes):
                    await form.feed(chunk)
                data, fields = form.result()
            else:
                data = await read_limited(chunks, settings.max_body_bytes)
    except TimeoutError:
        raise ApiError(
            408, "request_timeout", f"the request body did not arrive within {settings.body_timeout_s:g} s"
        ) from None
    source = resolve_source(header_values(headers, settings.source_header), fields.get(SOURCE_FIELD), client_host,
                            settings.trust_source_header, settings.source_header)
    return data, source


def check_source_id(source: str) -> str:
    """A source id to look up or reset: any text of 1 to :data:`MAX_SOURCE_CHARS` characters
    (ids loaded from a batch run or an audit need not follow the request rule)."""
    if not 0 < len(source) <= MAX_SOURCE_CHARS:
        raise ApiError(400, "bad_source", f"a source id has 1 to {MAX_SOURCE_CHARS} characters")
    return source


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
