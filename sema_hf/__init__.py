"""Switch EMA (SEMA) for the Hugging Face Trainer."""

from .config import SEMAConfig
from .store import EMAStore

__all__ = ["EMAStore", "SEMAConfig"]
__version__ = "0.1.0"
