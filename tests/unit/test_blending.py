"""Hann blending of sub-windows and test-time augmentation: pure functions on tensors, and the
run option that applies them (the untrained unit gallery, one process)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from resflow_mpi.blending import (AugmentedSegmenter, augmented, blend_window_px, hann_blend,
                                  hann_weights, sub_window_starts, tta_average, tta_transforms)


def test_sub_windows_cover_the_input_with_half_overlap() -> None:
    assert sub_window_starts(288, blend_window_px(288)) == [0, 72, 144]
    assert sub_window_starts(49, blend_window_px(49)) == [0, 12, 24]
    for total in range(2, 70):
        win = blend_window_px(total)
        starts = sub_window_starts(total, win)
        covered = np.zeros(total, int)
        for s in starts:
            covered[s:s + win] += 1
        assert covered.min() >= 1 and starts[-1] + win == total
    with pytest.raises(ValueError):
        sub_window_starts(10, 11)


def test_hann_weights_are_positive_and_peak_in_the_centre() -> None:
    w = hann_weights(9)
    assert (w > 0).all() and int(w.argmax()) == 4 and torch.allclose(w, w.flip(0))


def test_blending_a_position_independent_predictor_changes_nothing() -> None:
    """A predictor that looks at each pixel alone gives the same probabilities in every window:
    the weighted mean must return them exactly (weights normalised per pixel)."""
    x = torch.rand(2, 3, 40, 40)
    def pixelwise(t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(t.sum(1) - 1.5)
    torch.testing.assert_close(hann_blend(pixelwise, x), pixelwise(x))


def test_blending_favours_window_centres() -> None:
    """A predictor that is right (1) in a window's centre and wrong (0) within 4 px of its edges:
    blending keeps each pixel's prediction mostly from the windows where it lies centrally, so
    it beats the unweighted mean of the windows wherever they disagree."""
    x = torch.zeros(1, 1, 48, 48)
    def edge_blind(t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        r = torch.arange(h)[:, None].float()
        c = torch.arange(w)[None, :].float()
        d = torch.minimum(torch.minimum(r, h - 1 - r), torch.minimum(c, w - 1 - c))
        return (d >= 4).float().expand(t.shape[0], h, w)  # 1 (right) inside, 0 near the edges
    p = hann_blend(edge_blind, x)[0, 8:40, 8:40]
    win = 24
    right = torch.zeros(48, 48)
    count = torch.zeros(48, 48)
    for r in (0, 12, 24):
        for c in (0, 12, 24):
            right[r:r + win, c:c + win] += edge_blind(x[:, :, :win, :win])[0]
            count[r:r + win, c:c + win] += 1
    uniform = (right / count)[8:40, 8:40]
    disagree = (uniform > 0) & (uniform < 1)
    assert bool(disagree.any()) and bool((p[disagree] > uniform[disagree] + 0.1).all())
    assert float(p.min()) > 0.6


def test_tta_transforms_are_inverted() -> None:
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    for mode, count in (("none", 1), ("flips", 3), ("d4", 8)):
        pairs = tta_transforms(mode)
        assert len(pairs) == count
        for fwd, inv in pairs:
            torch.testing.assert_close(inv(fwd(x)), x)
        seen = {tuple(fwd(x).flatten().tolist()) for fwd, _ in pairs}
        assert len(seen) == count   # all distinct


def test_tta_average_of_an_equivariant_predictor_is_itself_and_symmetrises_others() -> None:
    x = torch.rand(1, 3, 16, 16)
    def pixelwise(t: torch.Tensor) -> torch.Tensor:
        return t.mean(1)
    torch.testing.assert_close(tta_average(pixelwise, x, "d4"), pixelwise(x))
    def left_biased(t: torch.Tensor) -> torch.Tensor:  # not flip-equivariant
        w = t.shape[-1]
        return torch.linspace(0, 1, w).expand(t.shape[0], t.shape[-2], w)
    ramp = left_biased(x)
    # flips: identity, left-right mirror (turned back: the ramp mirrored), up-down (unchanged)
    torch.testing.assert_close(tta_average(left_biased, x, "flips"), (2 * ramp + ramp.flip(-1)) / 3)
    p = tta_average(left_biased, x, "d4")
    torch.testing.assert_close(p, p.flip(-1))
    torch.testing.assert_close(p, torch.rot90(p, 1, (-2, -1)))


def test_augmented_segmenter_returns_logits_of_the_mean_probability() -> None:
    torch.manual_seed(0)
    net = nn.Conv2d(3, 1, 3, padding=1).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = torch.sigmoid(net(x))[:, 0]
        manual = sum(inv(torch.sigmoid(net(fwd(x)))[:, 0]) for fwd, inv in tta_transforms("d4")) / 8
        out = AugmentedSegmenter(net, "none", "d4")(x)
        blended = AugmentedSegmenter(net, "hann", "flips")(x)
    assert out.shape == (2, 1, 32, 32) and blended.shape == (2, 1, 32, 32)
    torch.testing.assert_close(torch.sigmoid(out)[:, 0], manual, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(torch.sigmoid(out)[:, 0], plain)
    loader = lambda b: net  # noqa: E731
    assert augmented(loader, "none", "none") is loader
    with pytest.raises(ValueError, match="tta"):
        AugmentedSegmenter(net, "none", "rot")  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["inference.blend=hann", "inference.tta=flips"])
def test_run_option_changes_probabilities_and_checksum(tmp_path: Path,
                                                       unit_fixtures: dict[str, Path],
                                                       option: str) -> None:
    """A run with the option gives other probabilities than a plain one (same store layout), and
    its configuration checksum differs, so a store made without it is not resumed with it."""
    from resflow_mpi.config import load_config
    from resflow_mpi.io.maskstore import MaskReader
    from tests.integration.test_outputs_belong_to_store import config, resflow
    scene, gallery = unit_fixtures["scene"], unit_fixtures["gallery"]
    probs = []
    for name, extra in (("plain", []), ("opt", ["--set", option])):
        cfg = config(tmp_path, scene, gallery, out=name, inference={"save_probabilities": True})
        assert resflow("run", str(cfg), "--quiet", *extra) == 0
        with MaskReader(str(tmp_path / name / "masks.h5")) as r:
            probs.append(next(p for _, p, _ in r.iter_probability_rows(0, 10_000)))
    valid = np.isfinite(probs[0].astype(np.float32))
    assert not np.array_equal(probs[0][valid], probs[1][valid])
    plain_cfg = load_config(str(tmp_path / "plain.yaml"), [])
    assert plain_cfg.checksum() != load_config(str(tmp_path / "plain.yaml"), [option]).checksum()
