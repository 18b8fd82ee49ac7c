"""``engine.gallery``: fixed image choice and panels drawn with torchvision's drawing utilities."""

from __future__ import annotations

import numpy as np
import torch

from rcnn_lab.engine.gallery import MIN_HEIGHT, PALETTE, TITLE_PX, draw_panel, gallery_indices

CATS = [{"id": 7, "name": "circle"}, {"id": 9, "name": "square"}]


def test_gallery_indices_are_evenly_spaced_over_the_evaluated_images():
    assert gallery_indices(100, 4) == [0, 33, 66, 99]
    assert gallery_indices(100, 4, max_images=10) == [0, 3, 6, 9]  # only images that were evaluated
    assert gallery_indices(3, 8) == [0, 1, 2] and gallery_indices(5, 0) == [] and gallery_indices(0, 3) == []


def _scene():
    image = torch.zeros(3, 64, 64)
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[0, 10:30, 10:30] = 1
    target = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([2]), "masks": mask, "image_id": 1}
    return image, target


def test_panel_shows_ground_truth_left_and_confident_detections_right():
    from pycocotools import mask as mask_utils

    image, target = _scene()
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((10, 10), np.uint8), ((40, 14), (40, 14)))))
    rle["counts"] = rle["counts"].decode("ascii")
    results = [{"image_id": 1, "category_id": 7, "bbox": [40.0, 40.0, 10.0, 10.0], "score": 0.9, "segmentation": rle},
               {"image_id": 1, "category_id": 9, "bbox": [0.0, 50.0, 8.0, 8.0], "score": 0.2, "segmentation": rle}]
    panel = draw_panel(image, target, results, CATS)
    scale = MIN_HEIGHT // 64
    assert panel.dtype == np.uint8 and panel.shape == (TITLE_PX + 64 * scale, 2 * 64 * scale + 4, 3)
    body = panel[TITLE_PX:]  # under the titles
    left, right = body[:, : 64 * scale], body[:, 64 * scale + 4:]
    square = np.array(PALETTE[1])  # label 2 (category 9) -> second colour
    circle = np.array(PALETTE[0])
    inside = left[20 * scale, 20 * scale].astype(int)  # GT mask blended over black: a dimmed colour of its class
    assert np.allclose(inside, 0.45 * square, atol=2)
    assert (right[20 * scale, 20 * scale] == 0).all()  # no detection there
    assert np.allclose(right[45 * scale, 45 * scale].astype(int), 0.45 * circle, atol=2)  # the 0.9 detection's mask
    assert (right[54 * scale, 4 * scale] == 0).all()  # the 0.2 detection is below the threshold: not drawn
    assert (panel[:, 64 * scale: 64 * scale + 4] == 255).all()  # white gap between the halves


def test_panel_without_detections_leaves_the_right_half_as_the_image():
    image, target = _scene()
    image[:] = 0.5
    panel = draw_panel(image, target, [], CATS)
    right = panel[TITLE_PX:, panel.shape[1] // 2 + 2:]
    assert (right == 128).all()


def test_each_half_has_a_title_strip_saying_which_side_it_is():
    from PIL import Image, ImageDraw, ImageFont

    image, target = _scene()
    panel = draw_panel(image, target, [], CATS, step=200)
    half = (panel.shape[1] - 4) // 2
    font = ImageFont.load_default(size=14)

    def strip(text: str) -> np.ndarray:  # the title as draw_panel must have written it
        canvas = Image.new("RGB", (half, TITLE_PX), "white")
        ImageDraw.Draw(canvas).text((4, 3), text, fill="black", font=font)
        return np.asarray(canvas)

    assert (panel[:TITLE_PX, :half] == strip("ground truth, image 1")).all()
    assert (panel[:TITLE_PX, half + 4:] == strip("prediction, score >= 0.5, step 200")).all()
    assert (panel[:TITLE_PX, :half] != strip("prediction, score >= 0.5, step 200")).any()  # the two sides differ
