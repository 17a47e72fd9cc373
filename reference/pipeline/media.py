"""Reading conditioning images/videos and writing task outputs (.npz, and .mp4 when an encoder exists)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from longcat_convert.core.errors import LongcatError

from .latents import to_pil

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_HINT = "a folder of frames, an animated GIF/WebP/PNG, an .npz with 'frames' or an .npy array"


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB (upstream's load_image converts too)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise LongcatError("image file does not exist", path) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise LongcatError(f"cannot read the image ({exc.__class__.__name__})", path) from None


def load_video(path: str | Path) -> list[Image.Image]:
    """RGB frames from a folder of images, an animated image, an .npz ('frames') / .npy array, or a video
    file when imageio with ffmpeg is installed. Float arrays in [0, 1] are converted as the demos do
    (×255, truncated)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise LongcatError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder", path)
        return [load_image(file) for file in files]
    if not path.is_file():
        raise LongcatError("video does not exist", path, f"pass {VIDEO_HINT}")
    if path.suffix in (".npz", ".npy"):
        return to_pil(_frames_array(path))
    try:
        with Image.open(path) as image:
            return [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
    except (UnidentifiedImageError, OSError):
        pass
    return _read_with_imageio(path)


def _frames_array(path: Path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
        frames = data["frames"] if isinstance(data, np.lib.npyio.NpzFile) else data
    except (OSError, ValueError, KeyError) as exc:
        raise LongcatError(f"cannot read frames ({exc.__class__.__name__}: {exc})", path,
                           "an .npz needs a 'frames' array [T, H, W, 3]") from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype not in (np.uint8, np.float32, np.float64):
        raise LongcatError(f"frames must be uint8 or float [T, H, W, 3], got {frames.dtype} {list(frames.shape)}",
                           path)
    return frames


def _read_with_imageio(path: Path) -> list[Image.Image]:
    try:
        import imageio.v3 as iio
    except ImportError:
        raise LongcatError("cannot read this video without imageio", path,
                           f"pip install imageio imageio-ffmpeg, or pass {VIDEO_HINT}") from None
    try:
        return [Image.fromarray(np.asarray(frame)).convert("RGB") for frame in iio.imiter(path)]
    except Exception as exc:  # imageio raises plugin-specific errors
        raise LongcatError(f"cannot read the video ({exc.__class__.__name__})", path) from None


def write_npz(path: Path, arrays: dict[str, np.ndarray], info: dict) -> None:
    """Write atomically: a partial file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as file:
            np.savez(file, info=np.array(json.dumps(info)), **arrays)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def mp4_writer_available() -> bool:
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """uint8 or [0, 1] float frames [T, H, W, 3] as H.264 (needs imageio-ffmpeg)."""
    import imageio_ffmpeg

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (frames * 255).astype(np.uint8)
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, macro_block_size=1)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
