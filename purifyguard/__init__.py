"""purifyguard: a robust diffusion purifier with adversarial guidance in front of any classifier."""

from purifyguard.config import PurifierConfig
from purifyguard.evaluation import evaluate
from purifyguard.presets import bundled_classifier, bundled_test_images
from purifyguard.purified_model import PurifiedModel
from purifyguard.purifier import Purifier
from purifyguard.registry import list_purifiers, load_purifier, register_purifier

__version__ = "0.1.0"

__all__ = [
    "PurifiedModel",
    "Purifier",
    "PurifierConfig",
    "bundled_classifier",
    "bundled_test_images",
    "evaluate",
    "list_purifiers",
    "load_purifier",
    "register_purifier",
]
