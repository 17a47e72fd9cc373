"""longcat-convert: streaming, verified conversion of LongCat-Video checkpoints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("longcat-convert")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"
