"""Images in chat requests, for GLM-4.xV models: fetch, decode and preprocess them on the router (CPU), so
the workers receive patches.

`image_url` parts take `data:` URLs, http(s) URLs (fetched with a size cap and a timeout) and local files
(`file://` or a path) only under `--allowed-local-media-path`; at most `--limit-mm-per-prompt` images per
request. Every failure is a 400 with an OpenAI-style error naming the image, never a 500.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx

from glmserve.engine.media import MediaError, image_from_bytes, image_from_data_url, split_chat_images
from glmserve.engine.mm_inputs import MultiModalPrompt, prepare_images
from glmserve.engine.vision_config import ImageProcessorConfig, VisionConfig, parse_vision_config
from glmserve.router.config import RouterConfig
from glmserve.router.errors import APIError


@dataclass(frozen=True)
class VisionInputs:
    vision: VisionConfig
    image_cfg: ImageProcessorConfig
    config: RouterConfig

    @classmethod
    def for_model(cls, config: RouterConfig) -> "VisionInputs | None":
        """The model's vision settings, or None for a text-only model."""
        path = Path(config.model) / "config.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        if raw.get("model_type") != "glm4v_moe" and "Glm4vMoeForConditionalGeneration" not in (raw.get("architectures") or []):
            return None
        return cls(parse_vision_config(raw), ImageProcessorConfig.from_dir(config.model), config)

    def split(self, messages: list[dict]) -> tuple[list[dict], list[str]]:
        """Messages with image parts replaced by the image placeholder, and the image URLs in order."""
        try:
            out, urls = split_chat_images(messages, lambda url: url)
        except MediaError as exc:
            raise APIError(400, str(exc), param="messages") from None
        limit = self.config.limit_mm_per_prompt
        if len(urls) > limit:
            raise APIError(400, f"at most {limit} images per request (--limit-mm-per-prompt), got {len(urls)}",
                           param="messages")
        if any(not isinstance(u, str) for u in urls):
            raise APIError(400, "image parts must be image_url parts", param="messages")
        return out, urls

    async def prepare(self, prompt_ids: list[int], urls: list[str]) -> tuple[list[int], MultiModalPrompt | None]:
        """Load every image and lay them into the prompt (placeholders widened to each image's tokens)."""
        if not urls:
            return prompt_ids, None
        blobs = await asyncio.gather(*(self._fetch(i, u) for i, u in enumerate(urls)))
        try:
            return await asyncio.to_thread(self._decode_and_place, prompt_ids, blobs)
        except (MediaError, ValueError) as exc:
            raise APIError(400, str(exc), param="messages") from None

    def _decode_and_place(self, prompt_ids, blobs):
        images = []
        for i, blob in enumerate(blobs):
            try:
                images.append(image_from_data_url(blob, self.config.max_image_pixels) if isinstance(blob, str)
                              else image_from_bytes(blob, self.config.max_image_pixels))
            except MediaError as exc:
                raise MediaError(f"image {i}: {exc}") from None
        return prepare_images(prompt_ids, images, self.vision, self.image_cfg)

    async def _fetch(self, index: int, url: str) -> bytes | str:
        """A data: URL as is (decoded in a thread), else the bytes behind the URL."""
        if url.startswith("data:"):
            return url
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https"):
            return await self._fetch_http(index, url)
        if scheme in ("file", ""):
            return self._read_local(index, url)
        raise APIError(400, f"image {index}: unsupported URL scheme {scheme!r} (data:, http(s):, file:)",
                       param="messages")

    async def _fetch_http(self, index: int, url: str) -> bytes:
        cap = self.config.max_image_bytes
        try:
            async with httpx.AsyncClient(timeout=self.config.media_fetch_timeout, follow_redirects=True) as client:
                async with client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise APIError(400, f"image {index}: fetching {url} returned HTTP {resp.status_code}",
                                       param="messages")
                    data = bytearray()
                    async for chunk in resp.aiter_bytes():
                        data += chunk
                        if len(data) > cap:
                            raise APIError(400, f"image {index}: {url} is larger than {cap} bytes", param="messages")
                    return bytes(data)
        except httpx.TimeoutException:
            raise APIError(400, f"image {index}: fetching {url} timed out after {self.config.media_fetch_timeout:g}s",
                           param="messages") from None
        except httpx.HTTPError as exc:
            raise APIError(400, f"image {index}: cannot fetch {url}: {type(exc).__name__}", param="messages") from None

    def _read_local(self, index: int, url: str) -> bytes:
        root = self.config.allowed_local_media_path
        if root is None:
            raise APIError(400, f"image {index}: local files are refused unless the server runs with "
                                "--allowed-local-media-path", param="messages")
        raw_path = unquote(urlparse(url).path) if url.startswith("file:") else url
        path = Path(raw_path).resolve()
        allowed = Path(root).resolve()
        if not path.is_relative_to(allowed):
            raise APIError(400, f"image {index}: {raw_path} is outside --allowed-local-media-path", param="messages")
        try:
            size = path.stat().st_size
            if size > self.config.max_image_bytes:
                raise APIError(400, f"image {index}: {raw_path} is larger than {self.config.max_image_bytes} bytes",
                               param="messages")
            return path.read_bytes()
        except OSError:
            raise APIError(400, f"image {index}: cannot read {raw_path}", param="messages") from None
