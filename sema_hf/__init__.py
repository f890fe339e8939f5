"""Switch EMA (SEMA) for the Hugging Face Trainer.

``Trainer(..., callbacks=[SEMACallback(horizon_epochs=0.3)])`` keeps an fp32 moving average of the trainable weights and
copies it into the model at every epoch end (Li et al., "Switch EMA", arXiv 2402.09240). In a hand-written accelerate
loop, ``SEMA(model, optimizer, accelerator, ...)`` with ``step()`` / ``epoch_end()`` / ``swapped_in()`` is the same core.
"""

from .callback import SEMACallback
from .config import SEMAConfig
from .hub import SEMATrainer
from .landscape import (
    Flatness,
    LossProfile,
    fixed_batches,
    flatness,
    loss_profile,
    mean_loss,
    plot_loss_profile,
    top_hessian_eigenvalue,
)
from .landscape_probe import LandscapeProbe
from .sema import SEMA
from .store import EMAStore

__all__ = [
    "EMAStore",
    "Flatness",
    "LandscapeProbe",
    "LossProfile",
    "SEMA",
    "SEMACallback",
    "SEMAConfig",
    "SEMATrainer",
    "fixed_batches",
    "flatness",
    "loss_profile",
    "mean_loss",
    "plot_loss_profile",
    "top_hessian_eigenvalue",
]
__version__ = "0.1.0"
