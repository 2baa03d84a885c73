"""Sliding-window softmax: shapes (2D and 3D, inputs smaller than the patch), agreement with a
whole-volume pass for a pointwise model, blending modes and mirroring TTA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from uumamba.config import InferenceConfig
from uumamba.inference.sliding import sliding_window_probabilities


def _plans(spatial_dims: int, patch, slice_axis: int = 2):
    return SimpleNamespace(spatial_dims=spatial_dims, patch_size=list(patch), slice_axis=slice_axis)


def _pointwise(spatial_dims: int, in_ch: int = 1, out_ch: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
    return conv(in_ch, out_ch, kernel_size=1)


def _contextual(spatial_dims: int, out_ch: int = 3) -> torch.nn.Module:
    """A model whose output depends on neighbours and is not mirror-symmetric."""
    torch.manual_seed(1)
    conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(conv(1, 4, 3, padding=1), torch.nn.Tanh(), conv(4, out_ch, 3, padding=1))


@pytest.mark.parametrize("shape", [(20, 24, 10), (6, 7, 3)])  # larger and smaller than the patch
def test_3d_pointwise_matches_whole_volume(shape):
    model = _pointwise(3)
    image = torch.randn(1, 1, *shape)
    cfg = InferenceConfig(overlap=0.5, gaussian=True, sw_batch_size=2)
    probs = sliding_window_probabilities(model, image, _plans(3, (8, 8, 4)), cfg)
    assert probs.shape == (1, 4, *shape)
    assert probs.dtype == torch.float32
    with torch.no_grad():
        expected = torch.softmax(model(image), dim=1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, *shape), atol=1e-5, rtol=0)


@pytest.mark.parametrize("slice_axis", [0, 2])
@pytest.mark.parametrize("shape", [(18, 20, 5), (5, 6, 4)])
def test_2d_slices_along_axis(slice_axis, shape):
    model = _pointwise(2, in_ch=2, out_ch=3)
    image = torch.randn(1, 2, *shape)
    cfg = InferenceConfig(overlap=0.25, gaussian=False, sw_batch_size=3)
    probs = sliding_window_probabilities(model, image, _plans(2, (8, 8), slice_axis), cfg)
    assert probs.shape == (1, 3, *shape)
    # Reference: apply the 2D model to every slice taken along slice_axis.
    with torch.no_grad():
        slices = image[0].movedim(slice_axis + 1, 0)
        expected = torch.softmax(model(slices), dim=1).movedim(0, slice_axis + 1)[None]
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)


def test_contextual_model_blending_differs_but_is_a_distribution():
    model = _contextual(3)
    image = torch.randn(1, 1, 16, 16, 8)
    plans = _plans(3, (8, 8, 4))
    gauss = sliding_window_probabilities(model, image, plans, InferenceConfig(gaussian=True))
    const = sliding_window_probabilities(model, image, plans, InferenceConfig(gaussian=False))
    torch.testing.assert_close(gauss.sum(1), torch.ones(1, 16, 16, 8), atol=1e-5, rtol=0)
    # Windows see zero padding at their borders, so the blending weights matter.
    assert (gauss - const).abs().max() > 1e-4


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_tta_makes_prediction_mirror_equivariant(spatial_dims):
    model = _contextual(spatial_dims)
    image = torch.randn(1, 1, 12, 10, 6)
    plans = _plans(spatial_dims, (8, 8, 4) if spatial_dims == 3 else (8, 8), slice_axis=2)
    cfg = InferenceConfig(overlap=0.5)
    plain = sliding_window_probabilities(model, image, plans, cfg, tta=False)
    tta = sliding_window_probabilities(model, image, plans, cfg, tta=True)
    assert tta.shape == plain.shape == (1, 3, 12, 10, 6)
    assert (tta - plain).abs().max() > 1e-4  # the model is not symmetric
    # Averaging over all flips of the mirrored axes: flipping the input flips the output.
    flipped = sliding_window_probabilities(model, torch.flip(image, (2,)), plans, cfg, tta=True)
    torch.testing.assert_close(torch.flip(flipped, (2,)), tta, atol=1e-5, rtol=1e-5)


def test_rejects_bad_input():
    model = _pointwise(3)
    cfg = InferenceConfig()
    with pytest.raises(ValueError, match="image must be"):
        sliding_window_probabilities(model, torch.randn(1, 8, 8, 8), _plans(3, (4, 4, 4)), cfg)
    with pytest.raises(ValueError, match="patch_size"):
        sliding_window_probabilities(model, torch.randn(1, 1, 8, 8, 8), _plans(3, (4, 4)), cfg)
