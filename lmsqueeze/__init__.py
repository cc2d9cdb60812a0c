"""lmsqueeze: compress large language models fast, then measure what compression did."""
__version__ = "0.1.0"

from lmsqueeze.errors import LmsqueezeError  # noqa: E402

__all__ = ["LmsqueezeError", "__version__"]
