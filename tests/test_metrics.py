import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipcore.linear_probe import linear_probe
from clipcore.metrics import classification_metrics, retrieval_metrics


def test_classification_metrics_known_answer():
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 3, 2, 1, -1, -2], [0.5, 0, 0.1, 0.2, 1, 2], [5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 2, 0, 5])
    m = classification_metrics(logits, labels)
    assert m["top1"] == pytest.approx(1 / 4)  # only row 0
    assert m["top5"] == pytest.approx(3 / 4)  # rows 0,1,2 have their label in the top five; row 3 ranks it last
    # per class: class0 rows {0,2}: 1 of 2; class2 row1: 0; class5 row3: 0 -> mean (0.5+0+0)/3
    assert m["mean_per_class_recall"] == pytest.approx(0.5 / 3)


def test_retrieval_recall_with_several_captions():
    # 3 images on the axes; 5 captions: image0 has captions 0,1; image1 has 2; image2 has 3,4.
    img = torch.eye(3)
    txt = F.normalize(torch.tensor([
        [0.1, 1.0, 0.0],   # cap0 of image0 but closest to image1 (miss at R@1 for t2i)
        [1.0, 0.0, 0.0],   # cap1 of image0: exact
        [0.0, 1.0, 0.2],   # cap2 of image1
        [0.0, 0.0, 1.0],   # cap3 of image2
        [1.0, 0.1, 0.9],   # cap4 of image2, nearer image0
    ]), dim=-1)
    r = retrieval_metrics(img, txt, [0, 0, 1, 2, 2], ks=(1, 2))
    # image->text: image0 best caption is cap1 (hit); image1 best cap0 (miss, belongs to image0); image2 best cap3 (hit)
    assert r["image_to_text"]["R@1"] == pytest.approx(2 / 3)
    # at K=2 image1's top-2 = cap0, cap2 -> hit
    assert r["image_to_text"]["R@2"] == pytest.approx(1.0)
    # text->image at R@1: cap0->img1 miss, cap1 hit, cap2 hit, cap3 hit, cap4->img0 miss
    assert r["text_to_image"]["R@1"] == pytest.approx(3 / 5)
    assert r["text_to_image"]["R@2"] == pytest.approx(1.0)


def test_retrieval_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="embedding sizes differ"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(2, 5), [0, 1])
    with pytest.raises(ValueError, match="captions"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4), [0, 1])


def test_linear_probe_separable_features():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 5
    y_tr, y_te = rng.integers(0, 3, 120), rng.integers(0, 3, 60)
    x_tr = centers[y_tr] + rng.normal(size=(120, 8))
    x_te = centers[y_te] + rng.normal(size=(60, 8))
    res = linear_probe(x_tr, y_tr, x_te, y_te, c_grid=(0.01, 1.0))
    assert res.top1 > 0.95 and res.best_c in (0.01, 1.0) and set(res.sweep) == {"0.01", "1"}
    # noise labels: probe must not be magically accurate
    res_noise = linear_probe(x_tr, rng.integers(0, 3, 120), x_te, rng.integers(0, 3, 60), c_grid=(1.0,))
    assert res_noise.top1 < 0.7
