"""Resolution buckets: the published tables and upstream's nearest-ratio choice
(reference/pipeline/README.md, "Resolution buckets and frame counts").

Keys are height/width ratios, values (height, width). The table depends on the resolution and on the
spatial scale factor (16 for stage 1, 64 for refinement, times the context-parallel split).
Tasks also accept an explicit (height, width) instead: the tables start at 320 pixels, far too large
for tiny test models; explicit sizes must still be divisible by the task's scale factor.
"""

from __future__ import annotations

from longcat_convert.core.errors import LongcatError

STAGE1_SCALE = 16  # VAE 8 × patch 2
REFINE_SCALE = 64  # × 4, the block-sparse-attention granularity

_627 = {
    "0.26": (320, 1216), "0.31": (352, 1120), "0.38": (384, 1024), "0.43": (416, 960), "0.52": (448, 864),
    "0.58": (480, 832), "0.67": (512, 768), "0.74": (544, 736), "0.86": (576, 672), "0.95": (608, 640),
    "1.05": (640, 608), "1.17": (672, 576), "1.29": (704, 544), "1.35": (736, 544), "1.50": (768, 512),
    "1.67": (800, 480), "1.73": (832, 480), "2.00": (896, 448), "2.31": (960, 416), "2.58": (992, 384),
    "2.75": (1056, 384), "3.09": (1088, 352), "3.70": (1184, 320), "3.80": (1216, 320), "3.90": (1248, 320),
    "4.00": (1280, 320),
}
_627_F64 = {
    "0.26": (320, 1216), "0.38": (384, 1024), "0.50": (448, 896), "0.67": (512, 768), "0.82": (576, 704),
    "1.00": (640, 640), "1.22": (704, 576), "1.50": (768, 512), "1.86": (832, 448), "2.00": (896, 448),
    "2.50": (960, 384), "2.83": (1088, 384), "3.60": (1152, 320), "3.80": (1216, 320), "4.00": (1280, 320),
}
_627_F128 = {
    "0.25": (256, 1024), "0.38": (384, 1024), "0.43": (384, 896), "0.57": (512, 896), "0.67": (512, 768),
    "1.00": (640, 640), "1.50": (768, 512), "1.75": (896, 512), "2.33": (896, 384), "2.67": (1024, 384),
    "4.00": (1024, 256),
}
_627_F256 = {
    "0.25": (256, 1024), "0.33": (256, 768), "0.50": (256, 512), "0.67": (512, 768), "1.00": (512, 512),
    "1.50": (768, 512), "2.00": (512, 256), "3.00": (768, 256), "4.00": (1024, 256),
}
_960 = {
    "0.25": (480, 1920), "0.29": (512, 1792), "0.32": (544, 1696), "0.36": (576, 1600), "0.40": (608, 1504),
    "0.49": (672, 1376), "0.54": (704, 1312), "0.59": (736, 1248), "0.69": (800, 1152), "0.74": (832, 1120),
    "0.82": (864, 1056), "0.88": (896, 1024), "0.94": (928, 992), "1.00": (960, 960), "1.07": (992, 928),
    "1.14": (1024, 896), "1.22": (1056, 864), "1.31": (1088, 832), "1.35": (1120, 832), "1.44": (1152, 800),
    "1.70": (1248, 736), "2.00": (1344, 672), "2.05": (1376, 672), "2.47": (1504, 608), "2.53": (1536, 608),
    "2.83": (1632, 576), "3.06": (1664, 544), "3.12": (1696, 544), "3.62": (1856, 512), "3.93": (1888, 480),
    "4.00": (1920, 480),
}
_960_F64 = {
    "0.22": (448, 2048), "0.29": (512, 1792), "0.36": (576, 1600), "0.45": (640, 1408), "0.55": (704, 1280),
    "0.63": (768, 1216), "0.76": (832, 1088), "0.88": (896, 1024), "1.00": (960, 960), "1.14": (1024, 896),
    "1.31": (1088, 832), "1.50": (1152, 768), "1.58": (1216, 768), "1.82": (1280, 704), "1.91": (1344, 704),
    "2.20": (1408, 640), "2.30": (1472, 640), "2.67": (1536, 576), "2.89": (1664, 576), "3.62": (1856, 512),
    "3.75": (1920, 512),
}
_960_F128 = {
    "0.20": (384, 1920), "0.27": (512, 1920), "0.33": (512, 1536), "0.42": (640, 1536), "0.50": (640, 1280),
    "0.60": (768, 1280), "0.67": (768, 1152), "0.78": (896, 1152), "1.00": (1024, 1024), "1.29": (1152, 896),
    "1.50": (1152, 768), "1.67": (1280, 768), "2.00": (1280, 640), "2.40": (1536, 640), "3.00": (1536, 512),
    "3.75": (1920, 512), "5.00": (1920, 384),
}
_960_F256 = {
    "0.33": (512, 1536), "0.60": (768, 1280), "1.00": (1024, 1024), "1.67": (1280, 768), "3.00": (1536, 512),
}

TABLES = {
    ("480p", 16): _627, ("480p", 32): _627, ("480p", 64): _627_F64, ("480p", 128): _627_F128,
    ("480p", 256): _627_F256,
    ("720p", 16): _960, ("720p", 32): _960, ("720p", 64): _960_F64, ("720p", 128): _960_F128,
    ("720p", 256): _960_F256,
}


def bucket_table(resolution: str, scale: int) -> dict[str, tuple[int, int]]:
    if (resolution, scale) not in TABLES:
        raise LongcatError(f"no bucket table for resolution {resolution!r} at scale factor {scale} "
                           f"(resolutions: 480p, 720p)")
    return TABLES[(resolution, scale)]


def bucket_size(height: int, width: int, resolution: str, scale: int) -> tuple[int, int]:
    """(height, width) of the bucket whose ratio key is nearest to height/width; first key on ties."""
    table = bucket_table(resolution, scale)
    ratio = height / width
    key = sorted(table, key=lambda k: abs(float(k) - ratio))[0]
    return table[key]


def target_size(source: tuple[int, int], size: tuple[int, int] | None, resolution: str, scale: int
                ) -> tuple[int, int]:
    """The explicit (height, width) if given, else the bucket of the source (height, width); checked."""
    height, width = size if size is not None else bucket_size(*source, resolution, scale)
    check_size(height, width, scale)
    return height, width


def check_size(height: int, width: int, scale: int) -> None:
    if height <= 0 or width <= 0 or height % scale or width % scale:
        raise LongcatError(f"height and width must be positive multiples of {scale}, got {height}x{width}")
