"""Sample decoders for the shard pipeline (raw tar bytes -> tensors) and image tensor helpers.

Decoders are callables `decode(raw, rng) -> dict` that raise SkipSample(reason) on bad input
(`rng`: a numpy Generator, or the training stream's lazily seeded `SampleRng`, used as one);
images are float tensors (3, H, W) in [-1, 1].
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from parti.data.shards import SkipSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _caption(raw: dict[str, Any]) -> str:
    """The stripped utf-8 caption of a raw sample; SkipSample when missing or not utf-8.

    A blank caption counts as missing: it would encode to the empty caption that classifier-free
    guidance trains on, silently raising the caption dropout rate.
    """
    if "txt" not in raw:
        raise SkipSample("missing_caption")
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        raise SkipSample("bad_caption") from exn
    if not caption:
        raise SkipSample("missing_caption")
    return caption


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image (PIL or uint8 array (H, W, 3)) -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    # numpy, not torch: small per-sample ops stay single-threaded and fast in the main process.
    chw = array.transpose(2, 0, 1).astype(np.float32)  # (3, H, W)
    return torch.from_numpy(chw / np.float32(127.5) - np.float32(1.0))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (..., 3, H, W) -> uint8 (..., H, W, 3), ready for PIL or image grids."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1)  # (..., H, W, 3)


class ImageDecoder:
    """Decode an image sample: shorter side resized to `size`, random (train) or centre crop."""

    def __init__(self, size: int, train: bool, max_pixels: int | None = None):
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        self.size = size
        self.train = train
        # Larger images are skipped rather than decoded: a guard against decompression bombs.
        self.max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels

    def __call__(self, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        ext = next((ext for ext in IMAGE_EXTS if ext in raw), None)
        if ext is None:
            raise SkipSample("missing_image")
        caption = _caption(raw)
        image = self._load(raw[ext])
        return {
            "image": to_tensor(self._crop(image, rng)),
            "caption": caption,
            "key": raw["__key__"],
        }

    def _load(self, data: bytes) -> Image.Image:
        """Decode to RGB, shorter side = size; SkipSample on anything PIL cannot read."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                if self.max_pixels and width * height > self.max_pixels:
                    raise SkipSample("image_too_large")
                # JPEG can decode at 1/2..1/8 scale directly, never below the requested size.
                image.draft("RGB", (self.size, self.size))
                image = ImageOps.exif_transpose(image)  # camera photos carry their rotation in EXIF
                if image.mode == "P" and "transparency" in image.info:
                    image = image.convert("RGBA")  # palette transparency straight to RGB warns
                image = image.convert("RGB")
        except Image.DecompressionBombError as exn:
            raise SkipSample("image_too_large") from exn
        except (OSError, ValueError, SyntaxError) as exn:
            raise SkipSample("corrupt_image") from exn
        width, height = image.size
        scale = self.size / min(width, height)
        if scale != 1:
            new_size = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
            image = image.resize(new_size, Image.Resampling.BICUBIC)
        return image

    def _crop(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        width, height = image.size
        if self.train:
            left = int(rng.integers(width - self.size + 1))
            top = int(rng.integers(height - self.size + 1))
        else:
            left, top = (width - self.size) // 2, (height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))


NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=64)
def _npy_spec(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of an .npy header; cached, since every array of a token shard
    repeats one header and numpy parses it with `literal_eval` (~20 us, most of a sample's load)."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
        np.lib.format.read_array_header_2_0
    try:
        return read(stream)
    except (RecursionError, MemoryError) as exn:  # a pathologically nested header literal
        raise ValueError(f"unparsable .npy header: {exn!r}") from exn


def load_npy(data: bytes) -> np.ndarray:
    """The array of a version 1.0 or 2.0 .npy file without pickled objects, as np.load(...,
    allow_pickle=False) reads it but at ~2 instead of ~30 us a sample; a read-only view of `data`
    (copy it to write). ValueError on bytes that are not such a file."""
    if not data.startswith(NPY_MAGIC) or len(data) < 10 or data[6] not in (1, 2) or data[7] != 0:
        raise ValueError("not a version 1.0 or 2.0 .npy file")
    width = 2 if data[6] == 1 else 4
    offset = 8 + width + int.from_bytes(data[8 : 8 + width], "little")
    shape, fortran, dtype = _npy_spec(data[:offset])
    if dtype.hasobject:
        raise ValueError(".npy file holds Python objects")
    if any(n < 0 for n in shape):
        raise ValueError(f".npy header has a negative shape {shape}")
    count = math.prod(shape)
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f".npy data truncated: {len(data) - offset} bytes for {shape} {dtype}")
    array = np.frombuffer(data, dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


class TokenDecoder:
    """Decode a token-shard sample: `tokens.npy` + caption -> tokens (grid * grid,) int64.

    `tokens.npy` must hold integers in [0, codebook_size), shaped (grid * grid,) as
    `parti.data.tokenize` writes them or (grid, grid); anything else is skipped as corrupt_tokens
    here rather than stopping training in collate or in the model's value check.
    """

    def __init__(self, grid: int, codebook_size: int):
        if grid < 1 or codebook_size < 1:
            raise ValueError(f"grid and codebook_size must be >= 1, got {grid}, {codebook_size}")
        self.shapes = ((grid * grid,), (grid, grid))
        self.codebook_size = codebook_size

    def __call__(self, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if "tokens.npy" not in raw:
            raise SkipSample("missing_tokens")
        caption = _caption(raw)
        try:
            tokens = load_npy(raw["tokens.npy"])
        except ValueError as exn:
            raise SkipSample("corrupt_tokens") from exn
        if not np.issubdtype(tokens.dtype, np.integer) or tokens.shape not in self.shapes:
            raise SkipSample("corrupt_tokens")
        if tokens.min() < 0 or tokens.max() >= self.codebook_size:
            raise SkipSample("corrupt_tokens")
        tokens = torch.from_numpy(tokens.astype(np.int64).reshape(-1))  # (N,)
        return {"tokens": tokens, "caption": caption, "key": raw["__key__"]}
