"""Digit scenes (``qkv.apps.tasks.digit_scenes``): the pixels are the scans at their boxes, nothing else is inked,
the boxes do not overlap and the caption reads left to right."""

from __future__ import annotations

import numpy as np
import pytest

from qkv.apps.tasks.digit_scenes import CANVAS, DIGIT, STEP, digit_scans, make_scenes


def test_scans_split_disjoint_and_complete():
    xtr, ytr, xte, yte = digit_scans(0)
    assert xtr.shape[1:] == (8, 8) and len(ytr) + len(yte) == 1797 and len(yte) == 359
    assert xtr.max() == 1.0 and xtr.min() == 0.0
    flat = {a.tobytes() for a in xtr}
    assert sum(a.tobytes() in flat for a in xte) < 5  # (a few scans are duplicated in the data set itself)


def test_scenes_are_their_scans_in_reading_order():
    xtr, ytr, _, _ = digit_scans(1)
    rng = np.random.default_rng(0)
    s = make_scenes(300, xtr, ytr, rng)
    assert s.images.shape == (300, 1, *CANVAS) and s.images.dtype == np.float32
    assert {len(d) for d in s.digits} == {3, 4, 5}
    for img, digits, boxes in zip(s.images[:, 0], s.digits, s.boxes):
        assert boxes.shape == (len(digits), 4)
        assert (boxes[:, 2] - boxes[:, 0] == DIGIT).all() and (boxes[:, 3] - boxes[:, 1] == DIGIT).all()
        assert (
            (boxes[:, :2] % STEP == 0).all() and (boxes[:, 2] <= CANVAS[0]).all() and (boxes[:, 3] <= CANVAS[1]).all()
        )
        assert (np.diff(boxes[:, 1]) > 0).all()  # strictly left to right
        ink = np.zeros(CANVAS, bool)
        for d, (t, l, b, r) in zip(digits, boxes):
            patch = img[t:b, l:r]
            # the patch is one of the scans of that digit
            assert any(np.array_equal(patch, x) for x in xtr[ytr == d])
            assert not ink[t:b, l:r].any()  # no overlap
            ink[t:b, l:r] = True
        assert not img[~ink].any()  # nothing outside the boxes


def test_scenes_are_seeded_and_checked():
    xtr, ytr, _, _ = digit_scans(0)
    a = make_scenes(20, xtr, ytr, np.random.default_rng(5))
    b = make_scenes(20, xtr, ytr, np.random.default_rng(5))
    np.testing.assert_array_equal(a.images, b.images)
    assert a.digits == b.digits
    with pytest.raises(ValueError, match="images must be"):
        make_scenes(2, xtr[:, :4], ytr, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_digits"):
        make_scenes(2, xtr, ytr, np.random.default_rng(0), n_digits=(3, 9))
