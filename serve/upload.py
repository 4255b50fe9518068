"""Reading a /predict body: one raw image, or a multipart body of one part per image, within the size and count
limits (413 as soon as a limit is known to be passed)."""
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from serve.model import InputError


async def body_chunks(request, limit):
    """The body as it streams in; 413 as soon as it is known to pass `limit`, by Content-Length or by count."""
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise InputError(400, "bad_request", "Content-Length is not a number")
    if length is not None and int(length) > limit:
        raise InputError(413, "body_too_large", f"the body is {int(length):,} bytes; the limit is {limit:,}")
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise InputError(413, "body_too_large", f"the body passed the limit of {limit:,} bytes")
            yield chunk
    except ClientDisconnect:
        raise InputError(400, "client_disconnected", "the client went away before sending the whole body") from None


async def read_images(request, p):
    """[(filename or None, bytes)] from a raw image body or a multipart body of one part per image."""
    media, options = parse_options_header(request.headers.get("content-type"))
    if media.startswith(b"image/"):
        data = bytearray()
        async for chunk in body_chunks(request, p.max_body_bytes):
            data += chunk
        return [(None, bytes(data))]
    if media != b"multipart/form-data":
        raise InputError(415, "unsupported_media_type", "send one image with Content-Type image/*, or "
                         "multipart/form-data with one part per image")
    if not options.get(b"boundary"):
        raise InputError(400, "malformed_multipart", "multipart/form-data without a boundary")
    return await read_parts(request, options[b"boundary"], p)


async def read_parts(request, boundary, p):
    parts, header, done = [], {}, []

    def begin():
        if len(parts) == p.max_images:
            raise InputError(413, "too_many_images", f"more than {p.max_images} images in one request")
        parts.append([None, bytearray()])
        header.clear()

    def header_end():
        name, value = bytes(header.pop("field", b"")).lower(), bytes(header.pop("value", b""))
        if name == b"content-disposition":
            filename = parse_options_header(value)[1].get(b"filename")
            parts[-1][0] = filename.decode("utf-8", "replace")[:255] if filename is not None else None

    callbacks = {
        "on_part_begin": begin,
        "on_header_field": lambda d, a, b: header.setdefault("field", bytearray()).extend(d[a:b]),
        "on_header_value": lambda d, a, b: header.setdefault("value", bytearray()).extend(d[a:b]),
        "on_header_end": header_end,
        "on_part_data": lambda d, a, b: parts[-1][1].extend(d[a:b]),
        "on_end": lambda: done.append(True),
    }
    refused = None
    try:
        parser = MultipartParser(boundary, callbacks)
        async for chunk in body_chunks(request, p.max_body_bytes):
            if refused is None:
                try:
                    parser.write(chunk)
                except InputError as e:     # read the rest (within max_body_bytes) first: an answer sent
                    refused = e             # mid-upload resets the upstream socket, and nginx says 502
    except (MultipartParseError, ValueError) as e:
        raise InputError(400, "malformed_multipart", f"the multipart body cannot be parsed: {e}") from None
    if refused is not None:
        raise refused
    if not done:
        raise InputError(400, "malformed_multipart", "the multipart body ends before its closing boundary")
    if not parts:
        raise InputError(400, "no_images", "the multipart body has no parts")
    return [(name, bytes(data)) for name, data in parts]
