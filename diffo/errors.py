"""The error types the codec raises. Only these escape the library on bad input, each with a message
that names the problem and, where there is one, the fix."""


class DiffoError(Exception):
    """Base class of every error the codec raises on purpose."""


class BitstreamError(DiffoError, ValueError):
    """A `.diffo` stream is not valid: bad magic, truncated, checksum mismatch, inconsistent fields."""


class UnsupportedVersionError(BitstreamError):
    """A `.diffo` stream was written by a newer (or unknown) format version."""


class ModelMismatchError(DiffoError):
    """A bitstream was made by a different model than the one asked to decode it."""


class ImageInputError(DiffoError, ValueError):
    """An input image cannot be used: not an image, unsupported mode, alpha without permission, size."""


class ModelLoadError(DiffoError):
    """A model cannot be found or loaded: missing folder, bad config, pickle weights, offline miss."""


class OutputExistsError(DiffoError, FileExistsError):
    """An output file already exists and the caller did not allow overwriting it."""


class MissingExtraError(DiffoError, ImportError):
    """An optional part of the package is needed and not installed; the message names the extra to install."""
