"""Images for the encoder: reading and decoding files, preprocessing, and the placeholder tokens.

The reference is Hugging Face's `Gemma3Processor` (the processor T5Gemma 2 checkpoints name) with
the released settings; what it does, and so what this module does:
* decoding: the first frame, turned upright by its EXIF orientation (as `transformers`'
  `load_image` does), then RGB: an image with transparency (an alpha band, or a palette or grey
  image with a transparent colour) is composited onto white, any other mode is converted
  ("L", "P", "CMYK", "1", ... -> "RGB"), as the processor's `do_convert_rgb` does;
* `preprocess`: resized to size x size with Pillow's bilinear filter on the uint8 image (the
  result is uint8 again), then x / 255 and (x - 0.5) / 0.5 in float32, giving [-1, 1]; channels
  last (NHWC), where the reference gives NCHW. Pan-and-scan stays off, as released. The
  reference here is the processor's PIL backend, the one `Gemma3ImageProcessor` uses when
  torchvision is not installed; its torchvision backend resizes differently (not bit-equal);
* `encode_with_images`: each `<start_of_image>` marker in the text becomes
  "\\n\\n", begin-of-image, T image-placeholder ids, end-of-image, "\\n\\n", where the newlines
  are tokenized together with the neighbouring text, exactly as the processor's tokenizer sees
  the expanded string. The number of markers must equal the number of images: the reference
  refuses a mismatch, and so does this module, also for a prompt with images and no marker
  (the reference inserts markers itself only when there is no text at all: for that case pass
  `" ".join([marker] * n)`).

Bad images raise `ImageError` (a ValueError), one line naming the file or example, the problem
and the way out. `ImageProblems` applies a source's `on_bad` policy to them: raise ("error") or
count and skip ("skip"). Everything here is module-level and picklable, for grain workers.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

from t5g2 import fs
from t5g2.data import sources

__all__ = ["ImageError", "ImageProblems", "IMAGE_MARKER", "MAX_IMAGE_PIXELS", "read_image_bytes",
           "decode_image", "load_image", "preprocess", "image_token_block",
           "encode_with_images"]

IMAGE_MARKER = "<start_of_image>"  # where an image goes in a prompt (the reference's boi token)
NEWLINES = "\n\n"  # the reference puts this on both sides of each image's tokens
# Larger images are refused before their pixels are decoded (a guard against decompression
# bombs: a small file that expands to gigabytes). Pillow's own default limit.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# ImageError reasons that are problems of one image file (skippable under on_bad="skip"); any
# other reason (e.g. "image_count", a prompt that does not match its images) always raises.
FILE_REASONS = ("missing_image", "unreadable_image", "empty_image", "corrupt_image",
                "image_too_large")
_SKIP_HINT = "on_bad='skip' skips and counts such examples"

log = logging.getLogger(__name__)


class ImageError(ValueError):
    """An image (or an example's images) cannot be used; the message names the file or example,
    the problem and the way out. `reason` is a short key, counted by `ImageProblems`; `where`
    and `problem` are the message's parts."""

    def __init__(self, message: str, reason: str = "corrupt_image", where: str = "",
                 problem: str = ""):
        super().__init__(message)
        self.reason, self.where, self.problem = reason, where, problem or message

    def __reduce__(self):  # keeps the fields across processes (grain workers)
        return type(self), (str(self), self.reason, self.where, self.problem)


def _file_error(reason: str, where: str, problem: str, way_out: str) -> ImageError:
    return ImageError(f"{where}: {problem}; {way_out} ({_SKIP_HINT})", reason, where, problem)


def read_image_bytes(path: str, where: str | None = None) -> bytes:
    """The bytes of the image file `path` (a local path or an object-store URI, through t5g2.fs);
    `where` names it in errors (default: the path)."""
    where = path if where is None else where
    try:
        return fs.read_bytes(path)
    except FileNotFoundError:
        raise _file_error("missing_image", where, "image file not found",
                          "check the path and that the file exists where it names") from None
    except IsADirectoryError:
        raise _file_error("unreadable_image", where, "is a directory, not an image file",
                          "point the example at an image file") from None
    except OSError as e:
        raise _file_error("unreadable_image", where, f"cannot read the image file ({e})",
                          "check its permissions and the storage") from None


def decode_image(data: bytes, where: str, *,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The image encoded in `data` (any format Pillow reads) as uint8 [H, W, 3] RGB, decoded in
    full here, so a truncated file fails now rather than later. `where` names the image in
    errors (a path, or an example and its image index)."""
    if not data:
        raise _file_error("empty_image", where, "zero-byte image",
                          "the file is empty: write the image again")
    _refuse_truncated_images()
    try:
        with warnings.catch_warnings():
            # the size is checked below, with a clear error, before any pixel is decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise _file_error("image_too_large", where,
                              f"image of {width}x{height} = {width * height} pixels is over the "
                              f"limit of {max_pixels} pixels (a decompression-bomb guard)",
                              "downscale it, or pass a larger max_pixels if it is genuine")
        image.load()  # Pillow decodes lazily: force it, so truncated data raises here
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise _file_error("corrupt_image", where,
                          f"cannot decode the image: no format Pillow reads recognises it (it "
                          f"starts {data[:12]!r})",
                          "check that it is an image file (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError as e:  # Pillow's own limit, at twice its MAX_IMAGE_PIXELS
        raise _file_error("image_too_large", where, f"image too large ({e})",
                          "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS too") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # Pillow reports unknown formats, truncated and corrupt data through these
        kind = type(e).__name__
        raise _file_error("corrupt_image", where,
                          f"cannot decode the image, corrupt or truncated ({kind}: {e})",
                          "check that the file opens in an image viewer and write it again") \
            from None


def _refuse_truncated_images() -> None:
    """Pillow decodes truncated files silently (padding them) while the process-wide
    `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is set, as some libraries do (tensorflow_datasets'
    image decoding): a truncated image must fail here instead, so the flag is turned off."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set (by another library); t5g2 "
                    "turns it off so that truncated images are reported, not padded")
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _to_rgb(image: Image.Image) -> np.ndarray:
    """RGB as the reference's do_convert_rgb: transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_image(source: str | bytes, where: str | None = None, *,
               max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An example's image as uint8 [H, W, 3] RGB: `source` is a path/URI (str) or the encoded
    bytes; `where` names it in errors (default: the path)."""
    if isinstance(source, str):
        where = source if where is None else f"{where} ({source})"
        data = read_image_bytes(source, where)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        where = "image bytes" if where is None else where
    else:
        raise TypeError(f"{where or 'image'}: expected a path (str) or encoded image bytes, got "
                        f"{type(source).__name__}")
    return decode_image(data, where, max_pixels=max_pixels)


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> float32 [size, size, 3] in [-1, 1], as the reference processor:
    bilinear resize of the uint8 image, then / 255, then (x - 0.5) / 0.5."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"preprocess: size={size!r} must be a positive integer")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"preprocess takes a uint8 [H, W, 3] RGB image (see decode_image), got "
                         f"{image.dtype} {list(image.shape)}")
    if image.shape[:2] != (size, size):
        resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
        image = np.asarray(resized)
    # the rescale in float64 then float32, the normalisation in float32: the reference's order
    scaled = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    half = np.float32(0.5)
    return (scaled - half) / half


def _image_ids(boi_id: int, image_id: int, eoi_id: int, tokens_per_image: int) -> np.ndarray:
    """begin-of-image, T image placeholders, end-of-image."""
    return np.asarray([boi_id, *[image_id] * tokens_per_image, eoi_id], dtype=np.int32)


def image_token_block(newline_ids: Sequence[int], boi_id: int, image_id: int, eoi_id: int,
                      tokens_per_image: int) -> np.ndarray:
    """The ids one image stands for on its own: the ids of "\\n\\n", begin-of-image, T image
    placeholders, end-of-image, the ids of "\\n\\n" (int32). Inside a text use
    `encode_with_images`, which tokenizes the newlines with the neighbouring text."""
    newlines = np.asarray(newline_ids, dtype=np.int32)
    return np.concatenate([newlines, _image_ids(boi_id, image_id, eoi_id, tokens_per_image),
                           newlines])


def encode_with_images(encode: Callable[[str], Sequence[int]], text: str, num_images: int, *,
                       tokens_per_image: int, boi_id: int, image_id: int, eoi_id: int,
                       marker: str = IMAGE_MARKER, where: str = "example") -> np.ndarray:
    """`text` as token ids (int32, no BOS/EOS) with each `marker` expanded as the reference
    processor expands it. `encode` tokenizes plain text (no BOS/EOS). The k-th marker is the k-th
    image; their numbers must agree (ImageError naming both otherwise), and the text must not
    itself encode to image-token ids."""
    pieces = text.split(marker)
    markers = len(pieces) - 1
    if markers != num_images:
        problem = f"{num_images} image(s) but {markers} {marker} marker(s) in its text"
        raise ImageError(f"{where}: {problem}; put one {marker} where each image goes, in image "
                         f"order", "image_count", where, problem)
    if tokens_per_image < 1:
        raise ValueError(f"tokens_per_image={tokens_per_image} must be >= 1")
    image_ids = _image_ids(boi_id, image_id, eoi_id, tokens_per_image)
    reserved = {boi_id, image_id, eoi_id}
    parts = []
    for k, piece in enumerate(pieces):
        # the reference tokenizes the expanded string, which its special tokens split into
        # "<text>\n\n" | boi image... eoi | "\n\n<text>\n\n" | ...: the newlines join the text
        segment = (NEWLINES if k > 0 else "") + piece + (NEWLINES if k < markers else "")
        ids = np.asarray(encode(segment) if segment else [], dtype=np.int32)
        if reserved.intersection(ids.tolist()):
            problem = (f"its text encodes to an image token id (begin/end-of-image or image "
                       f"placeholder) outside a {marker} marker")
            raise ImageError(f"{where}: {problem}; remove such token strings from the text",
                             "image_tokens_in_text", where, problem)
        parts.append(ids)
        if k < markers:
            parts.append(image_ids)
    return np.concatenate(parts)


class ImageProblems:
    """A source's `on_bad` policy for image files: "error" raises the ImageError, "skip" counts it
    by reason (and remembers the first few messages) so the caller can drop the example.
    Problems that are not of one image file (an example whose markers do not match its images)
    always raise. Counting is `sources`' document-problem tally, so reports read alike."""

    def __init__(self, on_bad: str):
        if on_bad not in sources._ON_BAD:
            raise ValueError(f"on_bad={on_bad!r}; valid: {', '.join(sources._ON_BAD)}")
        self.on_bad = on_bad
        self._tally = sources._Problems("skip")  # counts; the policy is applied here

    def __call__(self, error: ImageError) -> None:
        """Raises `error` under on_bad="error" (or when it is not a file problem); else counts."""
        if self.on_bad == "error" or error.reason not in FILE_REASONS:
            raise error
        self._tally(error.reason, error.where, "", error.problem)

    @property
    def counts(self) -> dict[str, int]:
        """Skipped images by reason."""
        return dict(sorted(self._tally.counts.items()))

    @property
    def examples(self) -> list[str]:
        """The first few skipped images' messages."""
        return list(self._tally.examples)

    def __len__(self) -> int:
        return len(self._tally)

    def report(self) -> str:
        """One line: what was skipped and why (or that nothing was)."""
        if not len(self):
            return "images: nothing skipped"
        reasons = ", ".join(f"{reason}={count}" for reason, count in self.counts.items())
        return f"images: skipped {reasons} (first: {'; '.join(self.examples)})"
