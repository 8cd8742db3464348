"""Which media types the engine decodes, and recognising one from its first bytes. Pure Python on purpose: the
gRPC client labels the media it sends with `sniff_mime_type` and must not load numpy, Pillow or PyAV."""

from __future__ import annotations

IMAGE_MIME_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
                    "image/gif": "GIF"}
VIDEO_MIME_TYPES = {"video/mp4", "video/webm", "video/x-matroska", "video/matroska", "video/quicktime",
                    "video/x-msvideo", "video/avi", "image/gif"}


def sniff_mime_type(data: bytes) -> str:
    """The MIME type of encoded media from its first bytes ("" if not recognised)."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video/x-msvideo"
    if head[4:8] == b"ftyp":
        return "video/quicktime" if head[8:10] == b"qt" else "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm" if b"webm" in data[:64] else "video/x-matroska"
    return ""
