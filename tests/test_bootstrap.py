"""Bootstrap intervals of per-query hits (clipcore.bootstrap) and the per-query hits they are drawn from."""

import pytest
import torch

from clipcore import bootstrap
from clipcore.bootstrap import Hits
from clipcore.metrics import retrieval_hits, retrieval_metrics, topk_accuracy, topk_hits


def _hits(values, ids=None) -> Hits:
    values = torch.as_tensor(values, dtype=torch.bool)
    return Hits(torch.arange(len(values)) if ids is None else torch.as_tensor(ids), values)


def test_score_interval_holds_the_mean_and_narrows_with_more_queries():
    g = torch.Generator().manual_seed(0)
    small, large = (_hits(torch.rand(n, generator=g) < 0.3) for n in (100, 2000))
    lo, hi = bootstrap.score_interval("d", small)
    assert lo < small.hits.float().mean() < hi
    lo2, hi2 = bootstrap.score_interval("d", large)
    assert hi2 - lo2 < (hi - lo) / 2  # ~1/sqrt(20) as wide
    assert bootstrap.score_interval("d", small) == (lo, hi)  # seeded by name and size: reproducible


def test_score_interval_covers_the_true_rate_about_95_percent_of_the_time():
    """Coverage of the percentile interval on Bernoulli(0.2) splits of 300 queries: a wrong
    resampling (e.g. resampling the same query every time) would miss far more often."""
    g = torch.Generator().manual_seed(1)
    covered = 0
    for trial in range(60):
        lo, hi = bootstrap.score_interval(f"split{trial}", _hits(torch.rand(300, generator=g) < 0.2), resamples=400)
        covered += lo <= 0.2 <= hi
    assert 51 <= covered <= 60


def test_queries_are_resampled_by_id_so_row_order_does_not_matter():
    values = torch.rand(50, generator=torch.Generator().manual_seed(2)) < 0.5
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    assert bootstrap.score_interval("d", _hits(values)) == bootstrap.score_interval("d", _hits(values[perm], perm))


def test_paired_intervals_of_a_model_against_itself_and_a_better_one():
    g = torch.Generator().manual_seed(4)
    ref = _hits(torch.rand(400, generator=g) < 0.4)
    assert bootstrap.ratio_interval("d", ref, ref) == (1.0, 1.0)
    assert bootstrap.difference_interval("d", ref, ref) == (0.0, 0.0)
    better = _hits(ref.hits | (torch.rand(400, generator=g) < 0.1))  # every hit of ref, and ~6 % more
    lo, hi = bootstrap.difference_interval("d", better, ref)
    assert 0 < lo < hi
    # the unpaired intervals overlap although the paired difference excludes zero
    assert bootstrap.score_interval("d", better)[0] < bootstrap.score_interval("d", ref)[1]
    rlo, rhi = bootstrap.ratio_interval("d", better, ref)
    assert 1.0 < rlo < better.hits.float().mean() / ref.hits.float().mean() < rhi


def test_pairing_keeps_the_queries_both_models_scored():
    a = _hits([1, 0, 1, 1], ids=[0, 1, 2, 3])
    b = _hits([1, 1, 0], ids=[3, 2, 0])  # image 1 failed to decode for b
    mine, theirs = bootstrap.paired(a, b)
    assert mine.tolist() == [1, 1, 1] and theirs.tolist() == [0, 1, 1]  # ids 0, 2, 3
    with pytest.raises(ValueError, match="no query in common"):
        bootstrap.paired(a, _hits([1], ids=[9]))


def test_ratio_is_none_when_a_resample_leaves_the_reference_at_zero():
    ref = _hits([0] * 19 + [1])  # one hit in 20: some resamples miss it
    assert bootstrap.ratio_interval("d", _hits([1] * 20), ref) is None


def test_mean_interval_over_datasets():
    a = torch.full((10,), 0.8, dtype=torch.double)
    b = torch.linspace(0.5, 0.7, 10, dtype=torch.double)
    lo, hi = bootstrap.mean_interval([a, b])
    assert 0.65 <= lo <= hi <= 0.75 and bootstrap.mean_interval([]) is None


def test_bad_hits_are_refused():
    with pytest.raises(ValueError, match="equal 1-d"):
        Hits(torch.arange(3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no queries"):
        bootstrap.resample_indices("empty", 0)


def test_per_query_hits_average_to_the_metrics():
    g = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(30, 7, generator=g), torch.randint(7, (30,), generator=g)
    for k in (1, 5):
        assert topk_hits(logits, labels, k).float().mean().item() == pytest.approx(topk_accuracy(logits, labels, k))
    images = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(9, 4, generator=g), dim=-1)
    owners = [0, 0, 1, 2, 2, 2, 3, 4, 4]  # image 5 has no caption: no image->text query
    rows, hits = retrieval_hits(images, texts, owners, ks=(1, 5))
    assert rows.tolist() == [0, 1, 2, 3, 4]
    metrics = retrieval_metrics(images, texts, owners, ks=(1, 5))
    for direction in ("image_to_text", "text_to_image"):
        for k in ("R@1", "R@5"):
            assert hits[direction][k].float().mean().item() == pytest.approx(metrics[direction][k])
    assert hits["image_to_text"]["R@1"].shape == (5,) and hits["text_to_image"]["R@1"].shape == (9,)


def test_wilson_interval_of_an_agreement():
    from clipcore.proportions import wilson_interval

    lo, hi = wilson_interval(0.5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # the textbook 5 of 10
    lo, hi = wilson_interval(1.0, 1000)  # all agree: not a point, unlike a bootstrap
    assert hi == 1.0 and 0.995 < lo < 0.997
    narrow, wide = wilson_interval(0.964, 4000), wilson_interval(0.964, 1000)
    assert wide[0] < narrow[0] < 0.964 < narrow[1] < wide[1]
    with pytest.raises(ValueError, match="no interval"):
        wilson_interval(0.5, 0)
    with pytest.raises(ValueError, match="proportion"):
        wilson_interval(1.2, 10)
