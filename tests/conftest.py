import os
import sys

import pytest

# Tests import their shared helpers (tiny.py, launch.py) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
for name, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(name, value)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's shared state reset before and after the test (``pytestmark = usefixtures(...)`` in a module)."""
    from tiny import reset_accelerate_state

    reset_accelerate_state()
    yield
    reset_accelerate_state()
