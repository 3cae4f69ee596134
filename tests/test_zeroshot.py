import pytest
import torch
import torch.nn.functional as F

from clipcore.templates import OPENAI_CIFAR, OPENAI_IMAGENET, get_templates
from clipcore.zeroshot import build_classifier


def test_template_sets_have_published_sizes():
    assert len(OPENAI_CIFAR) == 18 and len(set(OPENAI_CIFAR)) == 18
    assert len(OPENAI_IMAGENET) == 80 and len(set(OPENAI_IMAGENET)) == 80
    assert get_templates("simple") == ("a photo of a {}.",)
    with pytest.raises(ValueError, match="unknown template set"):
        get_templates("nope")
    with pytest.raises(ValueError, match="empty"):
        get_templates([])


def test_classifier_matches_hand_computed_reference(tiny_clip):
    names, temps = ["cat", "dog", "traffic light"], ["a photo of a {}.", "a drawing of the {}.", "{}"]
    head = build_classifier(tiny_clip, names, temps, batch_size=4)  # batch smaller than #prompts
    rows = []
    for name in names:
        embs = [tiny_clip.encode_text([t.format(name)])[0] for t in temps]  # one prompt at a time
        mean = torch.stack([e / e.norm() for e in embs]).mean(0)
        rows.append(mean / mean.norm())
    torch.testing.assert_close(head, torch.stack(rows), atol=1e-5, rtol=1e-5)
    assert head.shape == (3, tiny_clip.embed_dim)


def test_logits_are_scaled_cosines(tiny_clip):
    img = tiny_clip.encode_image(torch.randn(2, 3, 32, 32))
    head = build_classifier(tiny_clip, ["a", "b"], "simple")
    expected = tiny_clip.model.logit_scale.exp() * F.cosine_similarity(img[:, None], head[None], dim=-1) / 2.0
    torch.testing.assert_close(tiny_clip.logits(img, head, temperature=2.0), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        tiny_clip.logits(img, torch.randn(2, 7))


def test_empty_or_blank_classnames_rejected(tiny_clip):
    with pytest.raises(ValueError, match="class-name list is empty"):
        build_classifier(tiny_clip, [], "simple")
    with pytest.raises(ValueError, match="empty strings"):
        build_classifier(tiny_clip, ["cat", " "], "simple")
