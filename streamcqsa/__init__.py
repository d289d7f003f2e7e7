"""Exact long-context attention by cyclic-quorum-set division."""

from streamcqsa.attention import attention
from streamcqsa.cqs import divide, interest_set
from streamcqsa.cqs.budget import Budget, Estimate
from streamcqsa.cqs.budget import choose as plan

__all__ = ["Budget", "Estimate", "attention", "divide", "interest_set", "plan"]
__version__ = "0.1.0"
