"""Decoding images and label maps, turning every kind of bad file into ``BadInputError``."""

from __future__ import annotations

import io
import os
import zlib

import cv2
import numpy as np
from PIL import Image

from sfda_ray import storage
from sfda_ray.data.labels import VALID_IDS, check_format, describe_valid, label_lut

# What PIL raises on broken files: truncated data (OSError), bad chunks (SyntaxError),
# corrupt compressed text chunks (zlib.error), absurd sizes (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError)


class BadInputError(ValueError):
    """A single input file that cannot be used; jobs skip it and count the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _read(path: str | os.PathLike) -> bytes:
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise BadInputError(path, "file not found") from None
    except OSError as e:
        raise BadInputError(path, f"cannot read file: {e}") from e
    except ValueError as e:  # a name the filesystem cannot parse (an S3 key with "?")
        raise BadInputError(path, f"unusable path: {e}") from e
    if not data:
        raise BadInputError(path, "empty file")
    return data


def _open_pil(path: str | os.PathLike, data: bytes) -> Image.Image:
    """Fully decoded PIL image; relies on Pillow's default LOAD_TRUNCATED_IMAGES=False."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # open() only parses the header; truncation shows up here
    except Image.UnidentifiedImageError:
        raise BadInputError(path, "not an image file") from None
    except _DECODE_ERRORS as e:
        raise BadInputError(path, f"corrupt or truncated image: {e}") from e
    return img


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image as uint8 HxWx3 RGB, whatever its mode on disk."""
    img = _open_pil(path, _read(path))
    if img.mode.startswith("I"):
        # 16-bit (or 32-bit int) grey: keep the top 8 bits of the 16-bit range.
        grey = (np.asarray(img).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(img.convert("RGB"))  # a writable copy, as torch.from_numpy wants


def load_label(path: str | os.PathLike, label_format: str) -> np.ndarray:
    """Decode a label file to a uint8 HxW map of train ids (255 = ignore)."""
    check_format(label_format)
    data = _read(path)
    if label_format == "synthia":
        raw = _decode_synthia(path, data)
    else:
        img = _open_pil(path, data)
        if img.mode not in ("L", "P"):  # "P": GTA5 ships palette PNGs whose index is the id
            raise BadInputError(
                path, f"label must be a single-channel 8-bit PNG, got mode {img.mode}"
            )
        raw = np.asarray(img)
    present = np.flatnonzero(np.bincount(raw.ravel()))
    unknown = sorted(set(present.tolist()) - VALID_IDS[label_format])
    if unknown:
        shown = unknown[:10] + (["..."] if len(unknown) > 10 else [])
        raise BadInputError(
            path,
            f"unknown label ids {shown} for format {label_format} "
            f"(valid {describe_valid(label_format)})",
        )
    return label_lut(label_format)[raw]


def _decode_synthia(path: str | os.PathLike, data: bytes) -> np.ndarray:
    """Class ids of a SYNTHIA 16-bit RGB(A) label; Pillow cannot decode 16-bit colour."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise BadInputError(path, "not a decodable image (corrupt, truncated or not a PNG)")
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        channels = 1 if arr.ndim == 2 else arr.shape[2]
        raise BadInputError(path, f"SYNTHIA label must have 3 or 4 channels, got {channels}")
    return arr[:, :, 2]  # cv2 is BGR(A): the class id sits in R


HEADER_BYTES = 1 << 16


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file header only, without decoding pixels."""
    try:
        fs, p = storage.resolve(path)
    except ValueError as e:  # a name the filesystem cannot parse (an S3 key with "?")
        raise BadInputError(path, f"unusable path: {e}") from e
    try:
        if storage.is_uri(path):
            # One ranged read of the file's start: from a bucket, each small read PIL
            # makes while parsing a header would be a request of its own (6 to 9 per PNG).
            with fs.open_input_file(p) as f:
                head = f.read(HEADER_BYTES)
            try:
                with Image.open(io.BytesIO(head)) as img:
                    width, height = img.size
                return height, width
            except (*_DECODE_ERRORS, Image.UnidentifiedImageError):
                pass  # a header longer than that (or a bad file): read as a local file is
        with fs.open_input_file(p) as f, Image.open(f) as img:
            width, height = img.size
    except FileNotFoundError:
        raise BadInputError(path, "file not found") from None
    except Image.UnidentifiedImageError:
        raise BadInputError(path, "not an image file (or empty)") from None
    except _DECODE_ERRORS as e:
        raise BadInputError(path, f"unreadable header: {e}") from e
    return height, width
