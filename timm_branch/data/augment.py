"""Self-supervised augmentations computed on whole batches of tensors (CPU or GPU alike).

:class:`SSLAugment` turns a uint8 batch ``(B, C=3, H, W)`` into one normalised float32 view
``(B, 3, image_size, image_size)``, with the recipe of SimCLR/BYOL/CaSSLe (solo-learn's order):

1. random resized crop + horizontal flip: one affine map per sample
   (``torch.nn.functional.affine_grid`` + ``grid_sample``, bilinear);
2. colour jitter (brightness, contrast, saturation, hue) with probability ``jitter_p``;
3. grayscale with probability ``gray_p``;
4. gaussian blur with probability ``blur_p`` (per-sample sigma, grouped convolution);
5. solarisation with probability ``solarize_p``;
6. normalisation with ``mean`` and ``std``.

(solo-learn flips last; the flip commutes with steps 2-5, which are pointwise or symmetric, so it
is folded into the crop's affine map.) Every random choice is drawn **independently per sample**
(crop box, flip, whether to jitter and the four factors, grayscale, blur and its sigma,
solarisation), except the order of the four jitter operations, see below. All draws come from
``generator`` when given (a ``torch.Generator`` on any device; the global RNG is then untouched),
and they are always drawn, in a fixed sequence, whatever the probabilities: with one seed, the
crops are the same whether or not blur is enabled.

Differences from torchvision's per-image transforms, on purpose:

- The crop box is continuous: torchvision rounds width, height and corner to whole pixels; here
  they are real numbers (sub-pixel crops). The box distribution is otherwise torchvision's:
  area fraction uniform in ``[crop_min_scale, crop_max_scale]``, log aspect ratio uniform in
  ``log(crop_ratio)``, ten rejection attempts, then the same central fallback.
- ``grid_sample`` does not antialias. Crops that are upsampled (the usual case when images are
  stored at the training resolution, as :func:`~timm_branch.data.sources.load_source` does) are
  unaffected; a crop much larger than ``image_size`` aliases.
- Jitter order: torchvision draws a random order of the four jitter operations for every image.
  With ``jitter_order="batch"`` (default) one random order is drawn per batch and shared by its
  samples: each sample's order is still uniform over the 24 permutations, as in torchvision,
  but the samples of one batch are not independent in it. The order must be known on the host;
  when the draws are made on a GPU, it comes from torch's default CPU generator instead (which
  the trainer seeds per epoch), since reading a GPU draw back would wait for the GPU.
  ``jitter_order="fixed"`` always applies brightness, contrast, saturation, hue.
- Hue is shifted in float HSV (RGB -> HSV -> RGB on tensors), like torchvision's tensor backend
  (its PIL backend works on 8-bit HSV). Intermediate values are clamped to [0, 1] after each
  operation, as torchvision does for float images.

Pixel units: inputs are uint8 0..255 (or floating point already in [0, 1]); the crop, jitter,
grayscale, blur and solarisation work on [0, 1] floats; the output is normalised.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .resize import resize_center_crop

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
}
"""Per-channel ``(mean, std)`` of the [0, 1] pixels, by name (``TrainConfig.normalization``)."""

JITTER_ORDERS = ("batch", "fixed")
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision


# ----------------------------------------------------------------------------------------------
# functional colour operations on float images in [0, 1], (B, 3, H, W), per-sample factors (B,)


def _per_sample(factor: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(factor, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` of ``(B, 3, H, W)``, shape ``(B, 1, H, W)``."""
    r, g, b = x.unbind(dim=-3)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """``clamp(factor * x, 0, 1)``; ``factor`` >= 0, a scalar or one per sample."""
    return (x * _per_sample(factor, x)).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with the mean of its grayscale version: ``f x + (1 - f) mean``, clamped."""
    f = _per_sample(factor, x)
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (f * x + (1.0 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with its grayscale version: ``f x + (1 - f) gray``, clamped."""
    f = _per_sample(factor, x)
    return (f * x + (1.0 - f) * rgb_to_grayscale(x)).clamp(0.0, 1.0)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> HSV, each channel in [0, 1] (hue in turns)."""
    r, g, b = x.unbind(dim=-3)
    maxc = x.max(dim=-3).values
    minc = x.min(dim=-3).values
    delta = maxc - minc
    gray = delta == 0
    safe = torch.where(gray, torch.ones_like(delta), delta)
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    # hue in sixths: red is the maximum -> (g - b), green -> 2 + (b - r), blue -> 4 + (r - g)
    red_max = maxc == r
    green_max = (maxc == g) & ~red_max
    h = torch.where(
        red_max,
        (g - b) / safe,
        torch.where(green_max, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    h = torch.where(gray, torch.zeros_like(h), (h / 6.0) % 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel ``n`` in (R, G, B) is
    ``v - v s clamp(min(k, 4 - k), 0, 1)`` with ``k = (n' + 6 h) mod 6``, ``n'`` = 5, 3, 1."""
    h, s, v = x.unbind(dim=-3)
    # (5, 3, 1), made on the device: torch.tensor(..., device=cuda) would copy from the host and wait.
    offsets = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device).reshape(3, 1, 1)
    k = (offsets + 6.0 * h.unsqueeze(-3)) % 6.0
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v.unsqueeze(-3) - (v * s).unsqueeze(-3) * ramp


def adjust_hue(x: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]; 0.5 is 180 degrees), per sample."""
    hsv = rgb_to_hsv(x)
    h = (hsv[:, 0:1] + _per_sample(shift, x)) % 1.0
    return hsv_to_rgb(torch.cat((h, hsv[:, 1:]), dim=1)).clamp(0.0, 1.0)


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert the pixels ``>= threshold``: ``x -> 1 - x`` (PIL's ``ImageOps.solarize`` at 128)."""
    return torch.where(x >= threshold, 1.0 - x, x)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-d gaussian kernels, one per sigma: ``(B,)`` -> ``(B, kernel_size)``."""
    taps = torch.arange(kernel_size, dtype=sigma.dtype, device=sigma.device) - (kernel_size - 1) / 2
    weights = torch.exp(-(taps[None] ** 2) / (2.0 * sigma[:, None] ** 2))
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur every image with its own sigma: separable, reflect padding, grouped convolution.

    ``x``: ``(B, C, H, W)`` float; ``sigma``: ``(B,)`` > 0 in pixels; ``kernel_size``: odd.
    """
    b, c, h, w = x.shape
    kernels = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)  # (B*C, k)
    pad = kernel_size // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode=mode), kernels[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode=mode), kernels[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def default_blur_kernel_size(image_size: int) -> int:
    """About 10% of the image side, odd, at least 3 (23 for 224, 9 for 96, 3 for 32)."""
    k = int(0.1 * image_size)
    return max(3, k + 1 if k % 2 == 0 else k)


# ----------------------------------------------------------------------------------------------
# the augmentation modules


def _check_images(images: torch.Tensor, who: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{who} expects images of shape (B, 3, H, W), got {shape}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"{who} expects uint8 (0..255) or floating point ([0, 1]) images, got {images.dtype}")


def _as_float_images(images: torch.Tensor, who: str) -> torch.Tensor:
    """Validate, then uint8 0..255 -> float32 [0, 1]; floating point input -> float32 as is."""
    _check_images(images, who)
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def _check_probability(name: str, p: float) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return float(p)


@dataclass
class AugmentParams:
    """The random choices of one :class:`SSLAugment` call, for a batch of ``B`` images.

    Attributes:
        boxes: float ``(B, 4)``: crop ``x0, y0, w, h`` in input pixels (pixel-edge coordinates).
        flip: bool ``(B,)``: horizontally flipped.
        jittered: bool ``(B,)``: colour jitter applied.
        jitter: float ``(B, 4)``: brightness, contrast and saturation factors and the hue shift
            (turns); ``(1, 1, 1, 0)`` where not jittered.
        jitter_order: the order of the jitter operations, indices into (brightness, contrast,
            saturation, hue), shared by the batch.
        gray: bool ``(B,)``: converted to grayscale.
        blur: bool ``(B,)``: blurred.
        sigma: float ``(B,)``: blur sigma in output pixels (drawn even where ``blur`` is False).
        solarize: bool ``(B,)``: solarised.
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jittered: torch.Tensor
    jitter: torch.Tensor
    jitter_order: list[int]
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def select(self, rows: slice) -> "AugmentParams":
        """The choices of the samples ``rows`` of the batch; the jitter order stays the batch's."""
        per_sample = {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self) if f.name != "jitter_order"}
        return dataclasses.replace(self, **per_sample)


class SSLAugment(nn.Module):
    """One random SSL view of a batch, every random choice drawn per sample (see the module doc).

    Args:
        image_size: output side in pixels.
        crop_min_scale, crop_max_scale: range of the crop's area as a fraction of the image's.
        crop_ratio: range of the crop's aspect ratio (width / height); sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter: strengths ``(brightness, contrast, saturation, hue)``: the factors are uniform in
            ``[max(0, 1 - s), 1 + s]`` for the first three and the hue shift in ``[-s, s]`` turns
            (``s <= 0.5``), as torchvision's ``ColorJitter``.
        jitter_p: probability of applying the colour jitter.
        jitter_order: ``"batch"`` (a random order per batch) or ``"fixed"`` (b, c, s, h).
        gray_p: probability of converting to grayscale (three equal channels).
        solarize_p: probability of solarising (pixels >= 0.5 of [0, 1] are inverted).
        blur_p: probability of a gaussian blur.
        blur_sigma: range of the blur's sigma, in pixels of the output, sampled uniformly.
        blur_kernel_size: odd kernel size; default :func:`default_blur_kernel_size`.
        mean, std: per-channel normalisation of the [0, 1] result.

    ``forward(images, generator=None, rows=None)``: ``images`` uint8 ``(B, 3, H, W)`` (or float in
    [0, 1]) on any device -> float32 ``(B, 3, image_size, image_size)``, normalised, on the same
    device. It is ``apply(images, sample_params(B, H, W, generator, images.device))``; the two
    halves are public so that a view's random choices can be inspected, logged or replayed.
    With ``rows`` (a slice), the choices are still drawn for all ``B`` images but only
    ``images[rows]`` is augmented, with its own choices: ``forward(images, g, rows)`` equals
    ``forward(images, g)[rows]`` and leaves ``g`` in the same state (one rank's part of a global
    batch in data-parallel training).
    """

    def __init__(
        self,
        image_size: int,
        crop_min_scale: float = 0.08,
        crop_max_scale: float = 1.0,
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        jitter_order: str = "batch",
        gray_p: float = 0.2,
        solarize_p: float = 0.0,
        blur_p: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size = int(image_size)
        if not 0.0 < crop_min_scale <= crop_max_scale <= 1.0:
            raise ValueError(
                f"need 0 < crop_min_scale <= crop_max_scale <= 1, got {crop_min_scale}, {crop_max_scale}"
            )
        self.crop_scale = (float(crop_min_scale), float(crop_max_scale))
        if not 0.0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"need 0 < crop_ratio[0] <= crop_ratio[1], got {crop_ratio}")
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.flip_p = _check_probability("flip_p", flip_p)
        jitter = tuple(float(j) for j in jitter)
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(
                f"jitter must be 4 strengths (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, got {jitter}"
            )
        self.jitter = jitter
        self.jitter_p = _check_probability("jitter_p", jitter_p)
        if jitter_order not in JITTER_ORDERS:
            raise ValueError(f"jitter_order must be one of {JITTER_ORDERS}, got {jitter_order!r}")
        self.jitter_order = jitter_order
        self.gray_p = _check_probability("gray_p", gray_p)
        self.solarize_p = _check_probability("solarize_p", solarize_p)
        self.blur_p = _check_probability("blur_p", blur_p)
        if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"need 0 < blur_sigma[0] <= blur_sigma[1], got {blur_sigma}")
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        k = default_blur_kernel_size(self.image_size) if blur_kernel_size is None else int(blur_kernel_size)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd and positive, got {k}")
        self.blur_kernel_size = k
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1), persistent=False)
        # Jitter factor ranges (brightness, contrast, saturation, hue) as buffers: building them per
        # batch with torch.tensor(..., device="cuda") would copy from the host and wait for the GPU.
        bs, cs, ss, hs = jitter
        self.register_buffer("jitter_low", torch.tensor([max(0.0, 1 - bs), max(0.0, 1 - cs), max(0.0, 1 - ss), -hs]),
                             persistent=False)
        self.register_buffer("jitter_high", torch.tensor([1 + bs, 1 + cs, 1 + ss, hs]), persistent=False)
        self.register_buffer("jitter_identity", torch.tensor([1.0, 1.0, 1.0, 0.0]), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, crop_scale={self.crop_scale}, crop_ratio="
            f"({self.crop_ratio[0]:.4g}, {self.crop_ratio[1]:.4g}), flip_p={self.flip_p}, jitter={self.jitter}, "
            f"jitter_p={self.jitter_p}, jitter_order={self.jitter_order!r}, gray_p={self.gray_p}, "
            f"solarize_p={self.solarize_p}, blur_p={self.blur_p}, blur_sigma={self.blur_sigma}, "
            f"blur_kernel_size={self.blur_kernel_size}"
        )

    # -- random draws -------------------------------------------------------------------------

    @staticmethod
    def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        where = generator.device if generator is not None else device
        return torch.rand(shape, generator=generator, device=where).to(device)

    def crop_boxes(self, height: int, width: int, batch: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """Random crop boxes ``(batch, 4)``: ``x0, y0, w, h`` in pixels (continuous).

        torchvision's ``RandomResizedCrop.get_params`` per sample, vectorised and unrounded: up to
        ten attempts with area fraction ~ U(crop_scale) and log-ratio ~ U(log crop_ratio), the
        first that fits is used; else a central crop with the ratio clamped to ``crop_ratio``.
        """
        device = torch.device(device)
        attempts = 10
        u_area = self._rand((batch, attempts), generator, device)
        u_ratio = self._rand((batch, attempts), generator, device)
        u_pos = self._rand((batch, 2), generator, device)
        lo, hi = self.crop_scale
        area = height * width * (lo + (hi - lo) * u_area)
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = torch.sqrt(area * ratio)
        h = torch.sqrt(area / ratio)
        fits = (w <= width) & (h <= height)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
        w = w.gather(1, first).squeeze(1)
        h = h.gather(1, first).squeeze(1)
        in_ratio = width / height
        if in_ratio < self.crop_ratio[0]:
            fallback_w, fallback_h = float(width), width / self.crop_ratio[0]
        elif in_ratio > self.crop_ratio[1]:
            fallback_w, fallback_h = height * self.crop_ratio[1], float(height)
        else:
            fallback_w, fallback_h = float(width), float(height)
        any_fit = fits.any(dim=1)
        w = torch.where(any_fit, w, torch.full_like(w, fallback_w))
        h = torch.where(any_fit, h, torch.full_like(h, fallback_h))
        x0 = u_pos[:, 0] * (width - w)
        y0 = u_pos[:, 1] * (height - h)
        return torch.stack((x0, y0, w, h), dim=1)

    # -- the pipeline ---------------------------------------------------------------------------

    def sample_params(self, batch: int, height: int, width: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> AugmentParams:
        """Draw every random choice for a batch of ``batch`` images of ``height x width``.

        The draws are always made, in a fixed sequence, whatever the probabilities are. With a
        generator (or, without one, ``device``) on a GPU, the batch's jitter order is drawn from
        torch's default CPU generator (see the module docstring).
        """
        dev = torch.device(device)

        def rand(*shape: int) -> torch.Tensor:
            return self._rand(shape, generator, dev)

        boxes = self.crop_boxes(height, width, batch, generator, dev)
        flip = rand(batch) < self.flip_p
        jittered = rand(batch) < self.jitter_p
        u_jitter = rand(batch, 4)
        on_cpu = (generator.device if generator is not None else dev).type == "cpu"
        u_order = torch.rand(4, generator=generator if on_cpu else None)  # stays on the host
        gray = rand(batch) < self.gray_p
        blur = rand(batch) < self.blur_p
        u_sigma = rand(batch)
        solarized = rand(batch) < self.solarize_p

        lows, highs, identity = (t.to(dev) for t in (self.jitter_low, self.jitter_high, self.jitter_identity))
        factors = torch.where(jittered[:, None], lows + (highs - lows) * u_jitter, identity)
        order = u_order.argsort().tolist() if self.jitter_order == "batch" else [0, 1, 2, 3]
        lo, hi = self.blur_sigma
        return AugmentParams(boxes, flip, jittered, factors, order, gray, blur, lo + (hi - lo) * u_sigma, solarized)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment ``images`` (uint8 ``(B, 3, H, W)`` or float in [0, 1]) with given ``params``."""
        x = _as_float_images(images, type(self).__name__)
        b, _, height, width = x.shape
        size = self.image_size
        if b == 0:
            return x.new_empty(0, 3, size, size)

        def mask(chosen: torch.Tensor) -> torch.Tensor:  # bool (B,) -> (B, 1, 1, 1) on x's device
            return chosen.to(x.device)[:, None, None, None]

        # 1. crop + flip: output pixel k samples input x0 + (k + 0.5) w / size (pixel-edge coords)
        x0, y0, w, h = params.boxes.to(x).unbind(dim=1)
        sign = 1.0 - 2.0 * params.flip.to(x)
        theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0] = sign * w / width
        theta[:, 0, 2] = (2.0 * x0 + w) / width - 1.0
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2.0 * y0 + h) / height - 1.0
        grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp(0.0, 1.0)

        # 2. colour jitter (factors are the identity for the samples that are not jittered)
        if self.jitter_p > 0:
            factors = params.jitter.to(x)
            for op in params.jitter_order:
                if op == 0:
                    x = adjust_brightness(x, factors[:, 0])
                elif op == 1:
                    x = adjust_contrast(x, factors[:, 1])
                elif op == 2:
                    x = adjust_saturation(x, factors[:, 2])
                elif self.jitter[3] > 0:  # the HSV round trip is not exactly the identity: mask it
                    x = torch.where(mask(params.jittered), adjust_hue(x, factors[:, 3]), x)

        # 3. grayscale
        if self.gray_p > 0:
            x = torch.where(mask(params.gray), rgb_to_grayscale(x).expand_as(x), x)

        # 4. gaussian blur
        if self.blur_p > 0:
            x = torch.where(mask(params.blur), gaussian_blur(x, params.sigma.to(x), self.blur_kernel_size), x)

        # 5. solarisation
        if self.solarize_p > 0:
            x = torch.where(mask(params.solarize), solarize(x), x)

        # 6. normalisation
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                rows: slice | None = None) -> torch.Tensor:
        """One random view: ``apply(images, sample_params(...))``, of ``images[rows]`` only if given."""
        _check_images(images, type(self).__name__)  # before drawing anything
        b, _, height, width = images.shape
        params = self.sample_params(b, height, width, generator, images.device)
        if rows is not None:
            images, params = images[rows], params.select(rows)
        return self.apply(images, params)


def _pair(name: str, value: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    value = tuple(float(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be a probability or a pair (view 1, view 2), got {value}")
    return value


class TwoViewAugment(nn.Module):
    """Two independently augmented views of a batch, with per-view solarisation and blur.

    Args:
        image_size: output side.
        solarize_p, blur_p: a probability for both views, or a pair ``(view 1, view 2)``: the
            asymmetric BYOL recipe is ``blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)``, CaSSLe's
            CIFAR recipe for BYOL and Barlow Twins ``solarize_p=(0.0, 0.2)`` without blur.
        **kwargs: every other :class:`SSLAugment` argument, shared by both views.

    ``forward(images, generator=None, rows=None) -> [view1, view2]``, each float32
    ``(B, 3, image_size, image_size)``; view 2's draws follow view 1's on the same generator.
    ``rows`` as in :class:`SSLAugment`: both views of ``images[rows]``, drawn for the whole batch.
    """

    def __init__(self, image_size: int, solarize_p: float | Sequence[float] = 0.0,
                 blur_p: float | Sequence[float] = 0.0, **kwargs) -> None:
        super().__init__()
        s1, s2 = _pair("solarize_p", solarize_p)
        b1, b2 = _pair("blur_p", blur_p)
        self.view1 = SSLAugment(image_size, solarize_p=s1, blur_p=b1, **kwargs)
        self.view2 = SSLAugment(image_size, solarize_p=s2, blur_p=b2, **kwargs)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                rows: slice | None = None) -> list[torch.Tensor]:
        return [self.view1(images, generator, rows), self.view2(images, generator, rows)]


class EvalTransform(nn.Module):
    """Deterministic evaluation transform: resize (shorter side to ``image_size``, centre crop,
    antialiased bilinear; a no-op for images already ``image_size x image_size``) + normalise.

    ``forward(images)``: uint8 ``(B, 3, H, W)`` (or float in [0, 1]) -> float32
    ``(B, 3, image_size, image_size)``.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size = int(image_size)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _as_float_images(images, type(self).__name__)
        x = resize_center_crop(x, self.image_size).clamp(0.0, 1.0)
        return (x - self.mean) / self.std
