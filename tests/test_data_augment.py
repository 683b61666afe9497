"""Batched SSL augmentations: shapes, determinism, per-sample statistics, colour maths vs torchvision.

The statistical checks use 4096 tiny images and a 5-sigma binomial bound: a correct
implementation fails one of them with probability ~1e-6 (and the seeds are fixed, so a pass
is reproducible); a wrong rate (e.g. 0.4 instead of 0.5) is 12 sigma away and always fails.
"""
from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from timm_branch.data import EvalTransform, SSLAugment, TwoViewAugment
from timm_branch.data import augment as A

N = 4096
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # outputs stay in [0, 1] pixel units
OFF = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, solarize_p=0.0, blur_p=0.0)
NO_CROP = dict(crop_min_scale=1.0, crop_max_scale=1.0)  # the whole image, always


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_rate(observed: torch.Tensor, p: float, what: str) -> None:
    """``observed``: bool (n,); its mean must be within 5 binomial sigmas of ``p``."""
    n = observed.numel()
    rate = observed.float().mean().item()
    bound = 5 * math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) <= bound, f"{what}: rate {rate:.4f}, expected {p} +- {bound:.4f}"


def rand_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=gen(seed))


# ------------------------------------------------------------------------------------------ shapes


def test_shapes_dtypes_and_device():
    images = rand_images(6, 12, 10)
    out = SSLAugment(8, blur_p=0.5, solarize_p=0.5)(images, gen())
    assert out.shape == (6, 3, 8, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    views = TwoViewAugment(8)(images, gen())
    assert isinstance(views, list) and len(views) == 2
    assert all(v.shape == (6, 3, 8, 8) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1]), "the two views must be drawn independently"
    assert SSLAugment(8)(images[:0], gen()).shape == (0, 3, 8, 8)


def test_everything_off_is_normalisation_only():
    images = rand_images(4, 8, 8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = SSLAugment(8, **OFF, **NO_CROP, mean=mean, std=std)(images, gen())
    expected = (images.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_rejects_bad_inputs_and_arguments():
    aug = SSLAugment(8)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        aug(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="crop_min_scale"):
        SSLAugment(8, crop_min_scale=0.5, crop_max_scale=0.4)
    with pytest.raises(ValueError, match="flip_p"):
        SSLAugment(8, flip_p=1.5)
    with pytest.raises(ValueError, match="jitter"):
        SSLAugment(8, jitter=(0.4, 0.4, 0.2, 0.7))
    with pytest.raises(ValueError, match="jitter_order"):
        SSLAugment(8, jitter_order="sample")
    with pytest.raises(ValueError, match="blur_kernel_size"):
        SSLAugment(8, blur_kernel_size=4)
    with pytest.raises(ValueError, match="blur_p"):
        TwoViewAugment(8, blur_p=(0.1, 0.2, 0.3))


# ------------------------------------------------------------------------------------ determinism


def test_seeded_generator_is_deterministic_and_leaves_global_rng_alone():
    images = rand_images(16, 10, 10)
    aug = SSLAugment(8, blur_p=0.5, solarize_p=0.5)
    state = torch.get_rng_state()
    a, b = aug(images, gen(7)), aug(images, gen(7))
    assert torch.equal(torch.get_rng_state(), state), "a seeded call must not touch the global RNG"
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(images, gen(8)))
    # without a generator, the global RNG is used (and so seeding it reproduces the output)
    torch.manual_seed(3)
    c = aug(images)
    torch.manual_seed(3)
    assert torch.equal(c, aug(images))


def test_draws_do_not_depend_on_which_operations_are_enabled():
    """All draws are always made: enabling blur does not change the crops and flips."""
    aug, blurred = SSLAugment(8), SSLAugment(8, blur_p=1.0)
    p, q = aug.sample_params(32, 10, 10, gen(1)), blurred.sample_params(32, 10, 10, gen(1))
    assert torch.equal(p.boxes, q.boxes) and torch.equal(p.flip, q.flip) and torch.equal(p.gray, q.gray)


# --------------------------------------------------------------------- crop, flip, solarize stats


def coordinate_images(n: int, size: int) -> torch.Tensor:
    """Float images in [0, 1]: channel 0 encodes x, channel 1 y (both < 0.5), channel 2 is 0.8.

    Pixel j of channel 0 holds 0.45 (j + 0.5) / size: bilinear sampling at a continuous
    pixel-edge coordinate u returns 0.45 u / size, so the crop box is recoverable, and
    solarisation (which inverts values >= 0.5) only changes channel 2 (0.8 -> 0.2).
    """
    ramp = 0.45 * (torch.arange(size, dtype=torch.float32) + 0.5) / size
    one = torch.stack((ramp.expand(size, size), ramp[:, None].expand(size, size), torch.full((size, size), 0.8)))
    return one.expand(n, 3, size, size).contiguous()


def recover_boxes(out: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """From 2x2 outputs of :func:`coordinate_images`: output pixel k samples x0 + (k + 0.5) w / 2."""
    cx0, cx1 = out[:, 0, 0, 0], out[:, 0, 0, 1]
    cy0, cy1 = out[:, 1, 0, 0], out[:, 1, 1, 0]
    w = (cx1 - cx0).abs() * 2 * size / 0.45
    h = (cy1 - cy0) * 2 * size / 0.45
    x_left = torch.minimum(cx0, cx1) * size / 0.45 - w / 4
    y_top = cy0 * size / 0.45 - h / 4
    return dict(w=w, h=h, x0=x_left, y0=y_top, flip=cx1 < cx0, solarized=out[:, 2, 0, 0] < 0.5)


@pytest.fixture(scope="module")
def crop_stats():
    size = 16  # smallest crop side sqrt(0.08 * 256 * 3/4) = 3.9 px: the 2x2 samples stay >= 0.98 px inside
    aug = SSLAugment(2, flip_p=0.5, jitter_p=0.0, gray_p=0.0, solarize_p=0.3, **RAW)
    out = aug(coordinate_images(N, size), gen(11))
    return recover_boxes(out, size), size


def test_flip_rate_and_per_sample_independence(crop_stats):
    stats, _ = crop_stats
    assert_rate(stats["flip"], 0.5, "flip")
    assert_rate(stats["solarized"], 0.3, "solarize")
    assert_rate(stats["flip"] & stats["solarized"], 0.15, "flip and solarize together (independence)")
    first = stats["flip"][:64]
    assert first.any() and not first.all(), "flips must differ between samples of one batch"


def test_crop_area_and_ratio_ranges(crop_stats):
    stats, size = crop_stats
    area = stats["w"] * stats["h"] / size**2
    ratio = stats["w"] / stats["h"]
    eps = 1e-3
    assert area.min() >= 0.08 - eps and area.max() <= 1 + eps, (area.min(), area.max())
    assert area.min() < 0.09 and area.max() > 0.97, "the whole scale range must be reached"
    assert ratio.min() >= 3 / 4 - eps and ratio.max() <= 4 / 3 + eps, (ratio.min(), ratio.max())
    assert ratio.min() < 0.76 and ratio.max() > 1.32, "the whole ratio range must be reached"
    # boxes lie inside the image
    assert stats["x0"].min() >= -eps and (stats["x0"] + stats["w"]).max() <= size + eps
    assert stats["y0"].min() >= -eps and (stats["y0"] + stats["h"]).max() <= size + eps
    # crops are placed anywhere, not always at the same spot
    assert stats["x0"].std() > 1.0 and stats["y0"].std() > 1.0


def test_crop_area_distribution_matches_torchvision(crop_stats):
    """Mean area fraction equals torchvision's RandomResizedCrop.get_params (same rejection rule)."""
    stats, size = crop_stats
    ours = stats["w"] * stats["h"] / size**2
    torch.manual_seed(0)
    side = 1000  # large, so that torchvision's integer rounding is negligible
    image = torch.empty(1, side, side)
    theirs = []
    for _ in range(N):
        _, _, h, w = T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        theirs.append(h * w / side**2)
    theirs = torch.tensor(theirs)
    bound = 5 * math.sqrt(ours.var() / N + theirs.var() / N)
    assert abs(ours.mean() - theirs.mean()) <= bound, (ours.mean(), theirs.mean(), bound)


def test_custom_crop_scale_range():
    size = 16
    aug = SSLAugment(2, crop_min_scale=0.5, crop_max_scale=0.6, **OFF, **RAW)
    stats = recover_boxes(aug(coordinate_images(512, size), gen(2)), size)
    area = stats["w"] * stats["h"] / size**2
    assert area.min() >= 0.5 - 1e-3 and area.max() <= 0.6 + 1e-3, (area.min(), area.max())


def test_whole_image_when_no_crop():
    aug = SSLAugment(8, **OFF, **NO_CROP)
    params = aug.sample_params(64, 8, 8, gen(0))
    torch.testing.assert_close(params.boxes, torch.tensor([0.0, 0.0, 8.0, 8.0]).expand(64, 4))


# ------------------------------------------------------------------------------------- grayscale


def test_grayscale_rate():
    images = rand_images(N, 4, 4, seed=1)  # random colours: channels never equal by chance
    out = SSLAugment(4, gray_p=0.2, flip_p=0.0, jitter_p=0.0, **NO_CROP, **RAW)(images, gen(3))
    equal = (out.amax(dim=1) - out.amin(dim=1)).flatten(1).amax(dim=1) < 1e-6
    assert_rate(equal, 0.2, "grayscale")
    gray = out[equal]
    expected = A.rgb_to_grayscale(images[equal].float() / 255)
    torch.testing.assert_close(gray[:, :1], expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------- jitter


@pytest.mark.parametrize("order", ["batch", "fixed"])
def test_jitter_with_zero_strength_is_identity(order):
    images = rand_images(64, 8, 8, seed=2)
    aug = SSLAugment(8, jitter=(0, 0, 0, 0), jitter_p=1.0, jitter_order=order,
                     flip_p=0.0, gray_p=0.0, **NO_CROP, **RAW)
    torch.testing.assert_close(aug(images, gen(4)), images.float() / 255, atol=1e-6, rtol=0)


def test_jitter_rate_and_per_sample_brightness_factors():
    images = torch.full((N, 3, 2, 2), 100, dtype=torch.uint8)  # a flat gray: brightness only scales it
    aug = SSLAugment(2, jitter=(0.4, 0, 0, 0), jitter_p=0.8, flip_p=0.0, gray_p=0.0, **NO_CROP, **RAW)
    factor = aug(images, gen(5))[:, 0, 0, 0] / (100 / 255)
    changed = (factor - 1).abs() > 1e-6
    assert_rate(changed, 0.8, "jitter applied")
    f = factor[changed]
    assert f.min() >= 0.6 - 1e-5 and f.max() <= 1.4 + 1e-5
    assert f.min() < 0.61 and f.max() > 1.39, "factors must span [1 - 0.4, 1 + 0.4]"
    # uniform on [0.6, 1.4]: std 0.8 / sqrt(12); one shared factor per batch would give std 0
    assert abs(f.std().item() - 0.8 / math.sqrt(12)) < 0.01


def test_jitter_order_per_batch_and_fixed():
    batch = SSLAugment(8, jitter_order="batch")
    orders = {tuple(batch.sample_params(4, 8, 8, gen(s)).jitter_order) for s in range(60)}
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert len(orders) >= 12, f"a random order per batch should visit many of the 24 orders, got {len(orders)}"
    fixed = SSLAugment(8, jitter_order="fixed")
    assert {tuple(fixed.sample_params(4, 8, 8, gen(s)).jitter_order) for s in range(10)} == {(0, 1, 2, 3)}


def test_apply_follows_the_drawn_jitter_order():
    images = rand_images(8, 6, 6, seed=3)
    aug = SSLAugment(6, jitter=(0.8, 0.8, 0.8, 0.4), jitter_p=1.0, flip_p=0.0, gray_p=0.0, **NO_CROP, **RAW)
    params = aug.sample_params(8, 6, 6, gen(6))
    x = images.float() / 255
    ops = [A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        params.jitter_order = order
        expected = x
        for op in order:
            expected = ops[op](expected, params.jitter[:, op])
        torch.testing.assert_close(aug.apply(images, params), expected, atol=1e-5, rtol=0)
    a = aug.apply(images, params)
    params.jitter_order = [0, 1, 2, 3]
    assert not torch.allclose(a, aug.apply(images, params), atol=1e-3), "the order must matter here"


def test_colour_operations_match_torchvision():
    x = torch.rand(5, 3, 7, 9, generator=gen(8))
    x[0, :, 0, 0] = 0.5  # a gray pixel (undefined hue) and an exact red pixel
    x[1, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    factors = torch.tensor([0.3, 0.9, 1.0, 1.4, 2.0])
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.25, 0.5])
    cases = [
        (A.adjust_brightness, TF.adjust_brightness, factors),
        (A.adjust_contrast, TF.adjust_contrast, factors),
        (A.adjust_saturation, TF.adjust_saturation, factors),
        (A.adjust_hue, TF.adjust_hue, shifts),
    ]
    for ours, theirs, values in cases:
        expected = torch.stack([theirs(x[i], float(values[i])) for i in range(5)])
        torch.testing.assert_close(ours(x, values), expected, atol=2e-5, rtol=0, msg=ours.__name__)
    torch.testing.assert_close(A.rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(A.hsv_to_rgb(A.rgb_to_hsv(x)), x, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ blur and solarize


def test_gaussian_blur_matches_torchvision_per_sample():
    x = torch.rand(4, 3, 11, 11, generator=gen(9))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    ours = A.gaussian_blur(x, sigma, 5)
    for i in range(4):
        theirs = TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2)
        torch.testing.assert_close(ours[i], theirs, atol=1e-5, rtol=0)
    flat = torch.full((2, 3, 6, 6), 0.3)
    torch.testing.assert_close(A.gaussian_blur(flat, torch.tensor([0.5, 2.0]), 5), flat)


def test_blur_rate_and_per_sample_sigma():
    stripes = torch.zeros(1024, 3, 8, 8, dtype=torch.uint8)
    stripes[..., ::2] = 255
    aug = SSLAugment(8, blur_sigma=(1.0, 2.0), **{**OFF, "blur_p": 0.5}, **NO_CROP, **RAW)
    assert aug.blur_kernel_size == 3
    out = aug(stripes, gen(10))
    change = (out - stripes.float() / 255).abs().flatten(1).amax(dim=1)
    blurred = change > 1e-3
    assert_rate(blurred, 0.5, "blur")
    assert change[blurred].std() > 0.01, "each blurred sample has its own sigma"


def test_solarize_threshold():
    x = torch.tensor([0.0, 0.2, 0.49, 0.5, 0.8, 1.0]).view(1, 1, 1, 6)
    torch.testing.assert_close(A.solarize(x), torch.tensor([0.0, 0.2, 0.49, 0.5, 0.2, 0.0]).view(1, 1, 1, 6))


def test_two_views_have_asymmetric_solarisation():
    images = torch.full((256, 3, 4, 4), 204, dtype=torch.uint8)  # 0.8: solarised to 0.2
    views = TwoViewAugment(4, solarize_p=(0.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, **RAW)(images, gen(12))
    assert (views[0] > 0.5).all() and (views[1] < 0.5).all()
    assert TwoViewAugment(4, blur_p=(1.0, 0.1)).view2.blur_p == 0.1


def test_rows_augment_a_slice_with_the_whole_batch_draws():
    """A data-parallel rank's part: the slice of the one-process views, the generator left alike."""
    images = rand_images(12, 10, 10)
    aug = TwoViewAugment(8, blur_p=0.5, solarize_p=(0.0, 0.5))
    g_all, g_part = gen(5), gen(5)
    whole = aug(images, g_all)
    part = aug(images, g_part, rows=slice(4, 8))
    for w, p in zip(whole, part):
        assert p.shape == (4, 3, 8, 8)
        assert torch.equal(p, w[4:8])
    assert torch.equal(torch.rand(3, generator=g_all), torch.rand(3, generator=g_part))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; the CPU tests run the same code")
def test_cuda_matches_cpu():
    images = rand_images(64, 10, 10)
    cpu_aug = SSLAugment(8, blur_p=0.5, solarize_p=0.5)
    params = cpu_aug.sample_params(64, 10, 10, gen(0))
    expected = cpu_aug.apply(images, params)
    cuda_aug = SSLAugment(8, blur_p=0.5, solarize_p=0.5).cuda()
    torch.testing.assert_close(cuda_aug.apply(images.cuda(), params).cpu(), expected, atol=1e-4, rtol=0)
    out = cuda_aug(images.cuda(), torch.Generator("cuda").manual_seed(0))
    assert out.device.type == "cuda" and out.shape == (64, 3, 8, 8)
    assert torch.equal(out, cuda_aug(images.cuda(), torch.Generator("cuda").manual_seed(0)))


# ----------------------------------------------------------------------------------------- eval


def test_eval_transform_is_deterministic_resize_and_normalise():
    images = rand_images(3, 12, 16, seed=4)
    ev = EvalTransform(8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = ev(images)
    assert out.shape == (3, 3, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out, ev(images))
    square = rand_images(3, 8, 8, seed=5)
    torch.testing.assert_close(ev(square), (square.float() / 255 - 0.5) / 0.25)
    # a centre crop of the shorter-side resize: a 12x16 image whose outer columns differ
    framed = torch.zeros(1, 3, 12, 16, dtype=torch.uint8)
    framed[..., :2] = 255
    framed[..., -2:] = 255
    assert torch.allclose(EvalTransform(12, **RAW)(framed), torch.zeros(1, 3, 12, 12))
