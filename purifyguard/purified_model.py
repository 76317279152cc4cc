"""PurifiedModel: a purifier in front of any classifier, as one nn.Module from [0, 1] to logits."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from purifyguard.normalization import Normalize, input_channels, resolve_input_config
from purifyguard.purified_model_hub import PurifiedModelHubMixin
from purifyguard.purifier import Purifier
from purifyguard.registry import default_purifier_name, load_purifier
from purifyguard.validation import check_choice, check_images, check_int, check_optional_int

logger = logging.getLogger(__name__)

# Luminance weights (ITU-R BT.601) for an RGB input to a grey purifier.
_RGB_TO_GREY = (0.299, 0.587, 0.114)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")
# Images per classifier call when no graph is kept.
CLASSIFY_CHUNK = 512
# How the n_samples purifications combine: averaged logits, or a majority vote of their classes.
AGGREGATIONS = ("mean", "vote")
# Smaller images carry too little to classify: a 1x1 input is a mistake, not a picture.
MIN_IMAGE_SIDE = 8


class PurifiedModel(PurifiedModelHubMixin, nn.Module):
    """classifier(normalise(purify(x))) for x in [0, 1] at the classifier's input size.

    purifier: None picks the registered default that matches the classifier's input; a Purifier,
    a registered name, a local folder or a Hub repo id picks that one; False gives the bare
    classifier through the same interface (the undefended baseline).
    How the classifier wants its input is never guessed silently: it comes from mean/std (with
    input_size, the side of the square images it reads), a torchvision `weights` enum member
    (its transforms' mean, std and crop size), or a timm model's pretrained_cfg (as timm's own
    transforms read it), in that order. A torchvision model with none of these is refused
    (ValueError): it does not record its weights. Any other nn.Module gets no normalisation (a
    warning says so). `normalization_source` says where the normalisation came from.
    `n_samples` purifies each image that many times, independently; `aggregate` combines them:
    "mean" averages the logits, "vote" answers the class most of them predict (ties to the
    larger mean logit). A vote's output is log(share of votes) in value, with the averaged
    logits' gradient (straight through), so attacks still see a direction. The model starts in
    eval mode. save_pretrained, from_pretrained and push_to_hub share it like a purifier
    (purifyguard.purified_model_hub).
    """

    def __init__(
        self,
        classifier: nn.Module,
        purifier: Purifier | str | Path | None | bool = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        weights: object | None = None,
        input_size: int | None = None,
        n_samples: int = 1,
        interpolation: str = "bilinear",
        aggregate: str = "mean",
    ) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise ValueError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
        check_int("n_samples", n_samples, minimum=1)
        check_choice("aggregate", aggregate, AGGREGATIONS)
        check_choice("interpolation", interpolation, INTERPOLATIONS)
        check_optional_int("input_size", input_size, minimum=MIN_IMAGE_SIDE)
        self.classifier = classifier
        self.classifier_channels = input_channels(classifier)
        mean, std, resolution, source = resolve_input_config(classifier, mean, std, weights)
        self.normalize = Normalize(mean, std)
        self.normalization_source = source
        self.input_size = input_size or resolution
        self.n_samples = n_samples
        self.aggregate = aggregate
        self.interpolation = interpolation
        self.purifier = self._resolve_purifier(purifier)
        self.eval()

    @classmethod
    def undefended(cls, classifier: nn.Module, **kwargs) -> PurifiedModel:
        """The bare classifier behind the same interface, for baselines."""
        return cls(classifier, purifier=False, **kwargs)

    def with_purifier(self, purifier: Purifier | None) -> PurifiedModel:
        """The same classifier and input handling in front of another purifier (None: none)."""
        if purifier is not None and not isinstance(purifier, Purifier):
            raise ValueError(f"purifier must be a Purifier or None, got {type(purifier).__name__}")
        clone = copy.copy(self)
        clone._modules = dict(self._modules)
        clone.purifier = purifier
        return clone

    @property
    def defended(self) -> bool:
        return self.purifier is not None

    def _resolve_purifier(self, purifier) -> Purifier | None:
        if purifier is False:
            return None
        if purifier is None or purifier is True:
            name = default_purifier_name(self.classifier_channels, self.input_size)
            logger.info(
                "PurifiedModel: no purifier given, using the registered default %r for a "
                "%s-channel classifier", name, self.classifier_channels,
            )
            return load_purifier(name)
        return load_purifier(purifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        if self.n_samples == 1:
            return self.classify(self._purify_checked(x))
        repeated = x.repeat(self.n_samples, 1, 1, 1)
        logits = self.classify(self._purify_checked(repeated)).view(self.n_samples, x.shape[0], -1)
        mean = logits.mean(0)
        if self.aggregate == "mean":
            return mean
        return mean + (majority_vote(logits, mean) - mean).detach()

    def purify(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """The purified images, at the input's size and channels, in [0, 1]."""
        return self._purify_checked(self._check_input(x), **kwargs)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the classifier alone on images in [0, 1] (it normalises them).

        The classifier runs in its own dtype; the logits come back in the images' dtype. Without
        a graph, it runs on chunks of CLASSIFY_CHUNK images, so memory stays bounded.
        """
        dtype = next((p.dtype for p in self.classifier.parameters()), x.dtype)
        builds_graph = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.classifier.parameters())
        )
        try:
            if builds_graph or len(x) <= CLASSIFY_CHUNK:
                return self.classifier(self.normalize(x.to(dtype))).to(x.dtype)
            return torch.cat([
                self.classifier(self.normalize(chunk.to(dtype))).to(x.dtype)
                for chunk in x.split(CLASSIFY_CHUNK)
            ])
        except RuntimeError as error:
            if not _is_shape_mismatch(error):
                raise
            raise ValueError(
                f"the classifier cannot take images of shape {tuple(x.shape)}: "
                f"{str(error).strip().splitlines()[0]}. {self._expected_input()}"
            ) from error

    def _expected_input(self) -> str:
        """What the classifier reads, as far as it is known, and how to say it."""
        known = []
        if self.classifier_channels is not None:
            known.append(f"{self.classifier_channels}-channel images")
        if self.input_size is not None:
            known.append(f"{self.input_size}x{self.input_size} pixels (input_size="
                         f"{self.input_size})")
        values = flattened_inputs(self.classifier)
        if values is not None:
            known.append(f"{values} values per image (its first layer, "
                         f"nn.Linear(in_features={values}), reads the flattened image)")
        said = "; it expects " + ", ".join(known) if known else ""
        return (f"Pass images of the size the classifier was trained on{said} (PurifiedModel "
                "resizes only for the purifier, never for the classifier; state the size with "
                "input_size=)")

    def _purify_checked(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.purifier is None:
            return x
        size, channels = x.shape[-2:], x.shape[1]
        inside = self._to_purifier_space(x)
        purified = self.purifier.purify(inside, **kwargs)
        return self._from_purifier_space(purified, channels, size)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        x = check_images(x)
        if min(x.shape[-2:]) < MIN_IMAGE_SIDE:
            raise ValueError(
                f"images of {x.shape[-2]}x{x.shape[-1]} pixels are too small to classify; "
                f"expected at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"
                + (f" (this classifier reads {self.input_size}x{self.input_size})"
                   if self.input_size else "")
            )
        values = flattened_inputs(self.classifier)
        if values is not None and x[0].numel() != values:
            side = math.isqrt(values // x.shape[1]) if values % x.shape[1] == 0 else 0
            fits = (f" ({x.shape[1]}x{side}x{side} images)"
                    if side * side * x.shape[1] == values else "")
            stated = (f"input_size={self.input_size}" if self.input_size is not None
                      else "input_size not stated" + (f"; it is {side}" if fits else ""))
            raise ValueError(
                f"the classifier's first layer, nn.Linear(in_features={values}), reads {values} "
                f"values per image{fits}, but images of shape {tuple(x.shape)} have "
                f"{x[0].numel()} ({stated}); pass images of the size the classifier was trained "
                "on (PurifiedModel resizes only for the purifier, never for the classifier)"
            )
        if self.classifier_channels is not None and x.shape[1] != self.classifier_channels:
            raise ValueError(
                f"the classifier takes {self.classifier_channels}-channel images, got "
                f"{x.shape[1]} channels in shape {tuple(x.shape)}"
            )
        if self.purifier is not None and not _convertible(x.shape[1], self.purifier.channels):
            raise ValueError(
                f"cannot convert {x.shape[1]}-channel images to the purifier's "
                f"{self.purifier.channels} channels (only 1 <-> 3 is supported)"
            )
        return x

    def _to_purifier_space(self, x: torch.Tensor) -> torch.Tensor:
        x = _convert_channels(x, self.purifier.channels)
        return self._resize(x, (self.purifier.resolution, self.purifier.resolution))

    def _from_purifier_space(
        self, x: torch.Tensor, channels: int, size: torch.Size
    ) -> torch.Tensor:
        return self._resize(_convert_channels(x, channels), tuple(size))

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        align = False if self.interpolation in ("bilinear", "bicubic") else None
        resized = F.interpolate(x, size=size, mode=self.interpolation, align_corners=align)
        return resized.clamp(0, 1)


def flattened_inputs(classifier: nn.Module) -> int | None:
    """Values per image a classifier reads when it starts by flattening its input into an
    nn.Linear (an nn.Sequential, possibly nested, of parameter-free layers and nn.Flatten up to
    its first layer with weights, which is an nn.Linear): that layer's in_features. None for
    any other classifier (a convolution takes any size; an arbitrary forward is not read)."""
    if not isinstance(classifier, nn.Sequential):
        return None
    flattened = False
    stack = list(classifier)[::-1]
    while stack:
        module = stack.pop()
        if isinstance(module, nn.Sequential):
            stack.extend(list(module)[::-1])
            continue
        if isinstance(module, nn.Flatten):
            flattened = module.start_dim == 1 and module.end_dim == -1
            if not flattened:
                return None
            continue
        if next(module.parameters(), None) is not None or not _shape_preserving(module):
            return module.in_features if flattened and isinstance(module, nn.Linear) else None
    return None


def _shape_preserving(module: nn.Module) -> bool:
    """Parameter-free layers that keep the number of values per image."""
    return isinstance(module, (nn.Identity, nn.Dropout, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh,
                               nn.Sigmoid, nn.LeakyReLU))


def _is_shape_mismatch(error: RuntimeError) -> bool:
    """Whether a classifier's RuntimeError says that the input's shape does not fit a layer (not
    an out-of-memory error or a failure of its own code)."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    text = str(error)
    return any(pattern in text for pattern in (
        "shapes cannot be multiplied", "size mismatch", "must match the size of tensor",
        "Given groups=", "Calculated padded input size", "is invalid for input of size",
    ))


def _convertible(source: int, target: int) -> bool:
    return source == target or {source, target} == {1, 3}


def _convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB -> grey by luminance, grey -> RGB by repetition; otherwise unchanged."""
    if x.shape[1] == 3 and channels == 1:
        weights = torch.tensor(_RGB_TO_GREY, dtype=x.dtype, device=x.device)
        return (x * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    return x


def majority_vote(logits: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """log(share of the k purifications voting for each class), from (k, n, classes) logits;
    among classes of equal votes the larger mean logit wins (by a margin below one vote)."""
    votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(mean.dtype).mean(0)
    tie_break = 1e-3 / len(logits) * mean.detach().softmax(-1)
    return (votes + tie_break).log()
