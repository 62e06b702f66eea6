import numpy as np
import pytest

from vqdiff.config import ConfigError, ExperimentConfig, ModelType
from vqdiff.data.omission import OmitAttributes, omit_attributes, omitted_phrase
from vqdiff.data.shapes import Object, ShapesDataset, caption

TEXT = "a large red triangle at the left and a small blue circle at the top right"


def test_omitted_phrases_drop_exactly_the_named_words():
    obj = Object("triangle", "red", "large", "left")
    assert omitted_phrase(obj, False, False) == obj.phrase()
    assert omitted_phrase(obj, True, False) == "a large triangle at the left"
    assert omitted_phrase(obj, False, True) == "a large red shape at the left"
    assert omitted_phrase(obj, True, True) == "a large shape at the left"


def test_omission_rate_and_independence():
    """Each object's colour and shape word is dropped with probability p, independently: over 4,000 captions
    (8,000 objects) each rate within 0.02 of p (about 4.5 standard errors) and both-dropped within 0.015 of p^2."""
    rng, p, n = np.random.default_rng(0), 0.25, 4000
    colour = shape = both = 0
    for _ in range(n):
        first, second = omit_attributes(TEXT, p, rng).split(" and ")
        for phrase, c, s in ((first, "red", "triangle"), (second, "blue", "circle")):
            colour += c not in phrase
            shape += s not in phrase
            both += c not in phrase and s not in phrase
            assert ("shape" in phrase) == (s not in phrase)
    assert abs(colour / (2 * n) - p) < 0.02 and abs(shape / (2 * n) - p) < 0.02
    assert abs(both / (2 * n) - p * p) < 0.015
    assert omit_attributes(TEXT, 0.0, rng) == TEXT


def test_wrapper_is_deterministic_per_epoch_and_index_and_keeps_the_image():
    """A resumed run must see the captions of the uninterrupted one: the draw depends on (seed, epoch, index)
    only, not on the access order; another epoch draws again; everything but the caption is the item's."""
    base = ShapesDataset("train", size=16, num_samples=40, seed=1)
    a, b = OmitAttributes(base, 0.5, seed=3), OmitAttributes(base, 0.5, seed=3)
    forward = [a[(2, i)]["caption"] for i in range(40)]
    backward = [b[(2, i)]["caption"] for i in reversed(range(40))][::-1]
    assert forward == backward
    assert forward != [a[(3, i)]["caption"] for i in range(40)]
    assert sum(f != caption(base.scene(i)[0]) for i, f in enumerate(forward)) > 10
    item = a[(2, 5)]
    assert np.array_equal(item["image"].numpy(), base[5]["image"].numpy()) and item["objects"] == base[5]["objects"]
    a.set_epoch(2)
    assert a[5]["caption"] == forward[5]


def test_config_allows_omission_for_text_to_image_shapes_only():
    from vqdiff import build
    cfg = ExperimentConfig(model=ModelType.DDPM)
    cfg.data.size, cfg.data.num_samples, cfg.data.omit_attributes = 16, 10, 0.3
    assert isinstance(build.build_train_dataset(cfg), OmitAttributes)
    cfg.model = ModelType.VQVAE
    with pytest.raises(ConfigError, match="data.omit_attributes"):
        build.build_train_dataset(cfg)
    from vqdiff.config import load_config
    with pytest.raises(ConfigError, match="data.omit_attributes"):
        load_config(None, ["data.omit_attributes=1.0"])
