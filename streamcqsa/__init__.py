"""Exact long-context attention by cyclic-quorum-set division."""

from streamcqsa.attention import attention
from streamcqsa.cqs import divide, interest_set

__all__ = ["attention", "divide", "interest_set"]
__version__ = "0.1.0"
