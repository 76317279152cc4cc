"""A purifyguard purifier as an ART preprocessing defence (adversarial-robustness-toolbox).

    from art.estimators.classification import PyTorchClassifier
    from purifyguard.adapters.art import PurifierDefence

    defence = PurifierDefence(purifier, gradient="full")
    classifier = PyTorchClassifier(
        model=classifier_with_normalisation, loss=torch.nn.CrossEntropyLoss(),
        input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0),
        preprocessing_defences=[defence],
    )

ART's PyTorchClassifier runs a PreprocessorPyTorch defence's `forward` inside the autograd
graph when it computes `loss_gradient` or `class_gradient` (every defence of the estimator being
a PyTorch one), and under `no_grad` for `predict`. What an attacker's backward sees is therefore
decided by `forward`: "full" differentiates every reverse step of the purifier, "bpda" purifies
in the forward pass and passes the gradient through unchanged (the identity backward). The same
holds for `estimate_forward`, the differentiable estimate ART uses when it chains the defence
with non-PyTorch preprocessing.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

try:
    from art.defences.preprocessor.preprocessor import PreprocessorPyTorch
except ImportError as error:  # pragma: no cover - exercised only without ART
    raise ImportError(
        "purifyguard.adapters.art needs the adversarial-robustness-toolbox package: "
        'pip install adversarial-robustness-toolbox (or pip install "purifyguard[art]")'
    ) from error

from purifyguard.purified_model import PurifiedModel
from purifyguard.purifier import Purifier

GRADIENTS = ("full", "bpda")


class PurifierDefence(PreprocessorPyTorch):
    """Diffusion purification as an ART preprocessing defence on images in [0, 1], channels first.

    purifier: a Purifier (inputs at its resolution and channel count) or a PurifiedModel (inputs
        at the classifier's size and channels; it converts channels and resizes for the
        purifier, as it does for itself; its classifier is not used here).
    gradient: what the attacker differentiates. "full": autograd through every reverse step and
        the guidance term (the attack to trust). "bpda": the forward pass purifies, the backward
        pass is the identity (Athalye et al. 2018; an upper bound on robustness).
    batch_size: images purified per call (None: all at once). ART's `predict` hands the defence
        its whole input before it batches the classifier, so this bounds the purifier's memory.
    The purifier's other settings (t*, sampler, guidance, fixed_noise, checkpointing) apply as
    they are; its networks are shared, not copied, and moved to the defence's device.
    """

    params: ClassVar[list[str]] = ["gradient", "batch_size"]

    def __init__(
        self,
        purifier: Purifier | PurifiedModel,
        gradient: str = "full",
        *,
        batch_size: int | None = 64,
        apply_fit: bool = False,
        apply_predict: bool = True,
        device_type: str = "gpu",
    ) -> None:
        super().__init__(
            device_type=device_type, is_fitted=True, apply_fit=apply_fit,
            apply_predict=apply_predict,
        )
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.gradient = gradient
        self.batch_size = batch_size
        self._purifier = _with_gradient_mode(purifier, gradient).to(self.device)

    @property
    def purifier(self) -> Purifier:
        """The Purifier that runs, with gradient_mode set to this defence's gradient."""
        if isinstance(self._purifier, PurifiedModel):
            return self._purifier.purifier
        return self._purifier

    def forward(self, x: torch.Tensor, y: Any | None = None) -> tuple[torch.Tensor, Any | None]:
        """Purified images (same shape as x); the labels pass through unchanged."""
        if self.batch_size is None or len(x) <= self.batch_size:
            return self._purifier.purify(x), y
        chunks = [self._purifier.purify(part) for part in x.split(self.batch_size)]
        return torch.cat(chunks), y

    def estimate_forward(self, x: torch.Tensor, y: Any | None = None) -> torch.Tensor:
        """The differentiable estimate ART backpropagates through when it cannot chain forward:
        the purifier itself ("full") or the identity ("bpda", without purifying at all)."""
        if self.gradient == "bpda":
            return x
        return self.forward(x, y)[0]

    def _check_params(self) -> None:
        """Called by ART's set_params: a changed gradient switches the purifier's mode."""
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        if self.purifier.config.gradient_mode != self.gradient:
            self._purifier = _with_gradient_mode(self._purifier, self.gradient)


def art_classifier(
    model: PurifiedModel,
    gradient: str = "full",
    *,
    nb_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    device_type: str = "gpu",
    **classifier_kwargs: Any,
):
    """An ART PyTorchClassifier equivalent to a PurifiedModel: the purifier as a
    PurifierDefence, the classifier behind its own normalisation, inputs in [0, 1].

    input_shape defaults to the classifier's stated input (its channels and input_size), else
    the purifier's; nb_classes to the classifier's answer on a blank image of that shape. Extra
    keyword arguments go to PyTorchClassifier (loss, optimizer, ...); the loss defaults to cross
    entropy and clip_values to (0, 1).
    """
    from art.estimators.classification import PyTorchClassifier

    if not isinstance(model, PurifiedModel):
        raise ValueError(f"model must be a PurifiedModel, got {type(model).__name__}")
    if input_shape is None:
        input_shape = _input_shape(model)
    if nb_classes is None:
        with torch.no_grad():
            probe = torch.zeros(1, *input_shape, device=_device_of(model))
            nb_classes = int(model.classify(probe).shape[-1])
    defences = [] if model.purifier is None else [
        PurifierDefence(model, gradient, device_type=device_type)
    ]
    classifier_kwargs.setdefault("loss", nn.CrossEntropyLoss())
    classifier_kwargs.setdefault("clip_values", (0.0, 1.0))
    return PyTorchClassifier(
        model=nn.Sequential(model.normalize, model.classifier),
        input_shape=input_shape, nb_classes=nb_classes, preprocessing_defences=defences,
        device_type=device_type, **classifier_kwargs,
    )


def _with_gradient_mode(
    purifier: Purifier | PurifiedModel, gradient: str
) -> Purifier | PurifiedModel:
    if isinstance(purifier, Purifier):
        return purifier.with_settings(gradient_mode=gradient)
    if isinstance(purifier, PurifiedModel):
        if purifier.purifier is None:
            raise ValueError("this PurifiedModel has no purifier: there is nothing to defend with")
        return purifier.with_purifier(purifier.purifier.with_settings(gradient_mode=gradient))
    raise ValueError(
        f"purifier must be a purifyguard Purifier or PurifiedModel, got {type(purifier).__name__}"
    )


def _input_shape(model: PurifiedModel) -> tuple[int, int, int]:
    purifier = model.purifier
    channels = model.classifier_channels or (purifier.channels if purifier else None)
    size = model.input_size or (purifier.resolution if purifier else None)
    if channels is None or size is None:
        raise ValueError("pass input_shape=(C, H, W): the model does not state its input size")
    return (channels, size, size)


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device
