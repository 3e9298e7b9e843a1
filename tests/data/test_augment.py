from __future__ import annotations

import torch

from ltstudy.data import AugmentSpec, apply, autoaugment, cutout, normalize, random_crop, random_flip


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _batch(n=16, h=12, w=10):
    return torch.randint(1, 256, (n, 3, h, w), generator=_gen(99), dtype=torch.uint8)


def test_random_crop_shape_and_content():
    x = _batch()
    out = random_crop(x, padding=2, generator=_gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(len(x)):  # each sample is a shifted window of the zero-padded input
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        assert any(
            torch.equal(out[i], padded[:, dy : dy + 12, dx : dx + 10]) for dy in range(5) for dx in range(5)
        )
    assert random_crop(x, padding=0, generator=_gen()) is x


def test_reflect_crop_is_a_window_of_torchs_reflection_pad():
    """MetaSAug's pipeline pads by reflection (the reference's transforms); the window is drawn as with zeros."""
    x = _batch()
    out = random_crop(x, padding=4, generator=_gen(3), mode="reflect")
    zeros = random_crop(x, padding=4, generator=_gen(3))
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    for i in range(len(x)):
        windows = [(dy, dx) for dy in range(9) for dx in range(10 - 1) if torch.equal(out[i], padded[i, :, dy:dy + 12, dx:dx + 10])]
        assert windows
        dy, dx = windows[0]
        zero_padded = torch.nn.functional.pad(x[i], (4, 4, 4, 4))
        assert torch.equal(zeros[i], zero_padded[:, dy:dy + 12, dx:dx + 10]), "same offsets, other padding"
    assert (out > 0).all(), "no zero pixels: the border is reflected"


def test_flip_is_flip_where_chosen():
    x = _batch(64)
    out = random_flip(x, _gen())
    flipped = torch.tensor([torch.equal(o, f) for o, f in zip(out, x.flip(-1), strict=True)])
    same = torch.tensor([torch.equal(o, s) for o, s in zip(out, x, strict=True)])
    assert (flipped | same).all() and flipped.any() and same.any()


def test_determinism_with_equal_generators():
    x = _batch()
    spec = AugmentSpec(crop_padding=4, flip=True, cutout=4, autoaugment=True)
    a = apply(spec, x, (0.5,) * 3, (0.25,) * 3, _gen(7))
    b = apply(spec, x, (0.5,) * 3, (0.25,) * 3, _gen(7))
    c = apply(spec, x, (0.5,) * 3, (0.25,) * 3, _gen(8))
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)


def test_cutout_zeroes_a_square():
    x = torch.ones(32, 1, 20, 20)
    out = cutout(x, size=6, generator=_gen())
    for sample in out[:, 0]:
        zero = sample == 0
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        # the hole is a full rectangle, at most 6x6 (clipped at the border), at least 3x3
        assert zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert 3 <= len(rows) <= 6 and 3 <= len(cols) <= 6 and zero.sum() == len(rows) * len(cols)
    assert (out == 0).sum(dim=(1, 2, 3)).eq(36).any()


def test_normalize_and_autoaugment_keep_shape():
    x = _batch(20, 32, 32)
    y = normalize(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.allclose(y, x.float() / 127.5 - 1)
    z = autoaugment(x, _gen(1))
    assert z.shape == x.shape and z.dtype == torch.uint8
