"""Switch EMA (SEMA) for the Hugging Face Trainer.

``Trainer(..., callbacks=[SEMACallback(decay=0.999)])`` keeps an fp32 moving average of the trainable weights and
copies it into the model at every epoch end (Li et al., "Switch EMA", arXiv 2402.09240).
"""

from .callback import SEMACallback
from .config import SEMAConfig
from .store import EMAStore

__all__ = ["EMAStore", "SEMACallback", "SEMAConfig"]
__version__ = "0.1.0"
