"""Images from what callers hand us: bytes, `data:` URLs, chat message parts. Torch-free (the router uses it).

Decoding is checked up front: a file that is not an image, or whose pixel count is over `max_pixels`
(a decompression bomb), raises MediaError with a one-line reason before any resizing happens.
"""

from __future__ import annotations

import base64
import binascii
import io

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # decoded pixels of one image
IMAGE_PLACEHOLDER = "<|begin_of_image|><|image|><|end_of_image|>"  # how GLM-4.xV chat templates write an image


class MediaError(ValueError):
    """An image that cannot be used (undecodable, too large, unsupported source)."""


def image_from_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """A fully decoded PIL image."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise MediaError(f"image of {img.width}x{img.height} pixels is over the limit of {max_pixels} pixels")
        img.load()
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MediaError(f"cannot decode the image: {str(exc) or type(exc).__name__}") from None
    if img.width < 1 or img.height < 1:
        raise MediaError("the image is empty")
    return img


def image_from_data_url(url: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """`data:image/...;base64,...` -> PIL image."""
    head, sep, payload = url.partition(",")
    if not url.startswith("data:") or not sep:
        raise MediaError("a data URL looks like data:image/png;base64,<data>")
    if not head.endswith(";base64"):
        raise MediaError("only base64 data URLs are supported (data:<type>;base64,<data>)")
    mime = head[5:-7]
    if mime and not mime.startswith("image/"):
        raise MediaError(f"data URL of type {mime!r} is not an image")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data URL's base64 payload is malformed") from None
    return image_from_bytes(raw, max_pixels)


def split_chat_images(messages: list[dict], load_url) -> tuple[list[dict], list]:
    """Messages with every image part turned into the GLM image placeholder text, and the images in order.

    Image parts: {"type": "image_url", "image_url": {"url": ...} or "..."}, {"type": "image_pil",
    "image_pil": PIL image}, {"type": "image", "image": PIL image}. `load_url(url)` fetches a URL's image.
    Video parts are refused (not supported yet)."""
    out, images = [], []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise MediaError("an image_url part needs image_url.url")
                images.append(load_url(url))
            elif kind in ("image_pil", "image"):
                images.append(part.get(kind))
            elif kind in ("video_url", "video", "input_audio", "audio_url"):
                raise MediaError(f"{kind} parts are not supported (images only)")
            else:
                parts.append(part)
                continue
            parts.append({"type": "text", "text": IMAGE_PLACEHOLDER})
        out.append({**msg, "content": parts})
    return out, images
