"""Training augmentation of the paper image suites (RandomResizedCrop + flip, tasks/augment.py)."""
import numpy as np
import pytest
from PIL import Image

from tasks.augment import RATIO, Augment, batch_rng, crop_box


@pytest.mark.parametrize("size", [(30, 40), (46, 24), (200, 20), (20, 200), (224, 224)])
def test_crops_stay_inside_the_image_with_the_configured_area_and_ratio(size):
    rng = np.random.default_rng(0)
    width, height = size
    for _ in range(300):
        left, top, right, bottom = crop_box(width, height, (0.5, 1.0), rng)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        if (w, h) != (width, height) and RATIO[0] <= width / height <= RATIO[1]:
            assert w * h >= 0.5 * width * height * 0.9  # area fraction >= scale[0] (up to rounding)


def test_fallback_of_an_extreme_image_is_a_centred_crop_of_an_allowed_ratio():
    rng = np.random.default_rng(0)
    left, top, right, bottom = crop_box(200, 20, (0.99, 1.0), rng)  # no draw fits a 10:1 image
    assert (bottom - top, right - left) == (20, round(20 * RATIO[1])) and left == (200 - (right - left)) // 2


def test_the_same_batch_gets_the_same_crops_and_flips():
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8))
              for i in range(4)]
    aug = Augment(32, (0.5, 1.0), 0.5)
    a = aug(images, batch_rng(0, [3, 1, 4, 1]))
    b = aug(images, batch_rng(0, [3, 1, 4, 1]))
    c = aug(images, batch_rng(1, [3, 1, 4, 1]))
    assert all(x.size == (32, 32) for x in a)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    assert [x.tobytes() for x in a] != [x.tobytes() for x in c]
