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
from purifyguard.validation import check_bool, check_int, check_optional_int

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
    channels_first: the layout of the estimator's arrays, as ART's own preprocessors and
        PyTorchClassifier(channels_first=...) take it. True (PyTorchClassifier's default):
        (N, C, H, W); an array that looks channels-last, (N, H, W, C) with C of 1 or 3 where the
        model wants other channels, is refused with a ValueError saying so. False: (N, H, W, C),
        transposed for the purifier and back.
    The purifier's other settings (t*, sampler, guidance, fixed_noise, checkpointing) apply as
    they are; its networks are shared, not copied, and moved to the defence's device.
    """

    params: ClassVar[list[str]] = ["gradient", "batch_size", "channels_first"]

    def __init__(
        self,
        purifier: Purifier | PurifiedModel,
        gradient: str = "full",
        *,
        batch_size: int | None = 64,
        channels_first: bool = True,
        apply_fit: bool = False,
        apply_predict: bool = True,
        device_type: str = "gpu",
    ) -> None:
        super().__init__(
            device_type=device_type, is_fitted=True, apply_fit=apply_fit,
            apply_predict=apply_predict,
        )
        self.gradient = gradient
        self.batch_size = batch_size
        self.channels_first = channels_first
        _check_defence_params(gradient, batch_size, channels_first)
        self._purifier = _with_gradient_mode(purifier, gradient).to(self.device)

    @property
    def purifier(self) -> Purifier:
        """The Purifier that runs, with gradient_mode set to this defence's gradient."""
        if isinstance(self._purifier, PurifiedModel):
            return self._purifier.purifier
        return self._purifier

    def forward(self, x: torch.Tensor, y: Any | None = None) -> tuple[torch.Tensor, Any | None]:
        """Purified images (same shape and layout as x); the labels pass through unchanged."""
        if not self.channels_first:
            _check_rank(x, "(N, H, W, C) (channels_first=False)")
            x = x.permute(0, 3, 1, 2)
        else:
            _refuse_channels_last(x, _expected_channels(self._purifier))
        if self.batch_size is None or len(x) <= self.batch_size:
            purified = self._purifier.purify(x)
        else:
            purified = torch.cat([self._purifier.purify(part) for part in x.split(self.batch_size)])
        return (purified if self.channels_first else purified.permute(0, 2, 3, 1)), y

    def estimate_forward(self, x: torch.Tensor, y: Any | None = None) -> torch.Tensor:
        """The differentiable estimate ART backpropagates through when it cannot chain forward:
        the purifier itself ("full") or the identity ("bpda", without purifying at all)."""
        if self.gradient == "bpda":
            return x
        return self.forward(x, y)[0]

    def _check_params(self) -> None:
        """Called by ART's set_params: a changed gradient switches the purifier's mode."""
        _check_defence_params(self.gradient, self.batch_size, self.channels_first)
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
    the purifier's; a given one must be channels-first, (C, H, W), with the channels the model
    takes, and the classifier must accept it (a blank image of that shape is classified, before
    anything else; ValueError naming input_shape otherwise). nb_classes defaults to the number
    of the classifier's outputs on that image, and a given one must equal it. Extra keyword
    arguments go to PyTorchClassifier (loss, optimizer, ...); the loss defaults to cross entropy
    and clip_values to (0, 1). ART's channels_first=False is refused: the defence and the
    classifier take (N, C, H, W).
    """
    from art.estimators.classification import PyTorchClassifier

    if not isinstance(model, PurifiedModel):
        raise ValueError(f"model must be a PurifiedModel, got {type(model).__name__}")
    if classifier_kwargs.get("channels_first", True) is not True:
        raise ValueError(
            f"channels_first must be True, got {classifier_kwargs['channels_first']!r}: the "
            "PurifiedModel's classifier takes channels-first arrays (N, C, H, W); transpose "
            "channels-last arrays with x.transpose(0, 3, 1, 2)"
        )
    if nb_classes is not None:
        check_int("nb_classes", nb_classes, minimum=2)
    input_shape = _input_shape(model) if input_shape is None else _check_input_shape(
        model, input_shape)
    outputs = _probe_outputs(model, input_shape)
    if nb_classes is None:
        nb_classes = outputs
    elif nb_classes != outputs:
        raise ValueError(
            f"nb_classes={nb_classes}, but the classifier gives {outputs} logits per image of "
            f"input_shape {input_shape}; leave nb_classes out to read it off the classifier"
        )
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


def _check_defence_params(gradient: object, batch_size: object, channels_first: object) -> None:
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    check_optional_int("batch_size", batch_size, minimum=1)
    check_bool("channels_first", channels_first)


def _expected_channels(purifier: Purifier | PurifiedModel) -> int | None:
    """The channels the defence's input should have: the classifier's (a PurifiedModel converts
    1 <-> 3 for its purifier), else the purifier's."""
    if isinstance(purifier, PurifiedModel):
        if purifier.classifier_channels is not None:
            return purifier.classifier_channels
        purifier = purifier.purifier
    return None if purifier is None else purifier.channels


def _check_rank(x: object, layout: str) -> None:
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        raise ValueError(f"ART arrays for PurifierDefence must be 4-D {layout}, got shape "
                         f"{tuple(x.shape)}")


def _looks_channels_last(shape: tuple[int, ...], channels: int | None) -> bool:
    """(..., H, W, C) with C of 1 or 3: the channels-first axis does not hold the wanted
    channels (or, when they are not known, 1 or 3) while the last one holds 1 or 3."""
    first, last = shape[-3], shape[-1]
    wanted = (channels,) if channels is not None else (1, 3)
    return last in (1, 3) and first not in wanted


def _refuse_channels_last(x: object, channels: int | None) -> None:
    """ValueError when an ART array is channels-last, (N, H, W, C): ART hands the defence the
    estimator's arrays as they are, and PyTorchClassifier's default is channels_first=True."""
    _check_rank(x, "(N, C, H, W)")
    if isinstance(x, torch.Tensor) and _looks_channels_last(tuple(x.shape), channels):
        raise ValueError(
            f"PurifierDefence got an array of shape {tuple(x.shape)}, which looks channels-last "
            f"(N, H, W, C); ART arrays must be channels-first (N, C, H, W) for this defence "
            f"({channels or '1 or 3'} channels), as PyTorchClassifier's channels_first=True "
            "says. Transpose them (x.transpose(0, 3, 1, 2)), or pass channels_first=False to "
            "PurifierDefence if your estimator's arrays are channels-last"
        )


def _check_input_shape(model: PurifiedModel, input_shape: object) -> tuple[int, int, int]:
    """A given input_shape: (C, H, W) of positive integers, channels-first, with the channels
    the classifier takes and that the purifier can convert."""
    if (not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in input_shape)):
        raise ValueError(f"input_shape must be (channels, height, width), three integers >= 1, "
                         f"got {input_shape!r}")
    shape = tuple(int(v) for v in input_shape)
    if _looks_channels_last(shape, _expected_channels(model)):
        raise ValueError(
            f"input_shape {shape} looks channels-last (H, W, C); ART arrays must be channels-first "
            f"(N, C, H, W) for a PurifiedModel: give input_shape=({shape[2]}, {shape[0]}, "
            f"{shape[1]}) and transpose the arrays (x.transpose(0, 3, 1, 2))"
        )
    if model.classifier_channels is not None and shape[0] != model.classifier_channels:
        raise ValueError(
            f"input_shape {shape} has {shape[0]} channels, but the classifier takes "
            f"{model.classifier_channels}-channel images; give input_shape="
            f"({model.classifier_channels}, {shape[1]}, {shape[2]})"
        )
    return shape


def _probe_outputs(model: PurifiedModel, input_shape: tuple[int, int, int]) -> int:
    """The classifier's logits per image on a blank image of input_shape (its own checks first),
    or ValueError naming input_shape."""
    probe = torch.zeros(1, *input_shape, device=_device_of(model))
    try:
        model._check_input(probe)
        with torch.no_grad():
            return int(model.classify(probe).shape[-1])
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"input_shape {input_shape} does not fit the model: {error}") from None


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
