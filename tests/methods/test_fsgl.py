"""FSGL: feature-scaling factors, CutMix label, SAM step, and one synthetic epoch."""

from __future__ import annotations

import math

import torch

from ltstudy.methods.fsgl import (
    FSGL,
    FSGLParams,
    cutmix,
    cutmix_box,
    frequency_ranks,
    fsm_factors,
    label_weights,
    sam_step,
    soft_ce,
)


def test_fsm_factors_cifar10():
    counts = torch.tensor([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
    s = fsm_factors(counts, 0.5)
    expected = torch.tensor([1.50, 1.45, 1.40, 1.35, 1.30, 1.25, 1.20, 1.15, 1.10, 1.05], dtype=torch.float64)
    assert torch.allclose(s, expected, atol=1e-9, rtol=0)


def test_fsm_factors_follow_frequency_rank_not_index():
    counts = torch.tensor([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    shuffled = counts[perm]  # class k now has count counts[perm[k]], i.e. rank perm[k]
    s = fsm_factors(shuffled, 0.5)
    assert torch.equal(frequency_ranks(shuffled), perm)
    assert torch.allclose(s, 1.5 - 0.05 * perm.double(), atol=1e-9, rtol=0)
    # ties: broken by class index
    assert frequency_ranks(torch.tensor([3, 7, 3, 7])).tolist() == [2, 0, 3, 1]


def test_label_weights_sum_to_c():
    w = label_weights(torch.tensor([100, 10, 1]), 1.2)
    assert math.isclose(float(w.sum()), 3.0, rel_tol=1e-12)
    assert w[2] > w[1] > w[0]


def test_cutmix_label_equals_pasted_area_fraction():
    a, b = torch.zeros(2, 3, 32, 32), torch.ones(2, 3, 32, 32)
    for lam, cy, cx in [(0.5, 16, 16), (0.3, 0, 0), (0.8, 31, 5), (0.0, 2, 30)]:
        box = cutmix_box(32, 32, lam, cy, cx)
        out, lam_a = cutmix(a, b, box)
        pasted = float(out[0, 0].mean())  # fraction of pixels coming from b
        assert math.isclose(lam_a, 1.0 - pasted, abs_tol=1e-12)
        assert torch.equal(out[1], out[0])
    # a clipped corner box: the label differs from the sampled lambda (the reference's bug)
    _, lam_a = cutmix(a, b, cutmix_box(32, 32, 0.5, 0, 0))
    assert lam_a > 0.5


def test_cutmix_box_side_is_the_ceiling_as_in_glmc():
    # λ = 0.5: 32·√0.5 = 22.6 → side 23 (floor would be 22); the box spans centre ± 23 // 2
    assert cutmix_box(32, 32, 0.5, 16, 16) == (5, 27, 5, 27)
    assert cutmix_box(32, 32, 0.75, 16, 16) == (8, 24, 8, 24)  # √0.25·32 = 16 exactly
    assert cutmix_box(32, 32, 0.99, 16, 16) == (14, 18, 14, 18)  # 3.2 → 4 (floor: 3, box 15..17)


def test_mixup_and_cutmix_batches_take_separate_forwards():
    """BatchNorm normalises each of the two batches with its own statistics, as in the reference."""
    from ltstudy.methods.fsgl import FSGLNet
    from ltstudy.models import build_backbone

    torch.manual_seed(0)
    net = FSGLNet(build_backbone("resnet32"), 4).train()
    x1, x2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8) * 3 + 1
    phi = torch.ones(6)
    (z1, *_), (z2, *_) = net((x1, x2), (phi, phi))
    alone = net([x2], [phi])[0][0]
    assert torch.allclose(z2, alone, atol=1e-5)
    together = net([torch.cat([x1, x2])], [torch.ones(12)])[0][0]
    assert not torch.allclose(together[6:], z2, atol=1e-3), "one 2B batch would share BN statistics"
    assert net.projection.out_features == 32 and net(x1).shape == (6, 4)


def test_soft_ce_equals_ce_on_one_hot():
    z, y = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    assert torch.allclose(soft_ce(z, torch.nn.functional.one_hot(y, 4).float()),
                          torch.nn.functional.cross_entropy(z, y))


def test_sam_step_matches_hand_computation():
    # loss(w) = (w·x - t)^2 with a 2-parameter linear model; plain SGD, no momentum / wd
    lin = torch.nn.Linear(2, 1, bias=False)
    w0 = torch.tensor([[0.3, -0.7]])
    with torch.no_grad():
        lin.weight.copy_(w0)
    x, t, lr, rho = torch.tensor([[1.5, 2.0]]), 0.25, 0.1, 0.05
    opt = torch.optim.SGD(lin.parameters(), lr=lr)

    def closure():
        return ((lin(x) - t) ** 2).sum()

    loss = sam_step(list(lin.parameters()), closure, opt, rho)

    def grad(w):
        r = float((w * x).sum()) - t
        return 2 * r * x

    g1 = grad(w0)
    e = rho * g1 / g1.norm()
    expected = w0 - lr * grad(w0 + e)
    assert torch.allclose(lin.weight.detach(), expected, atol=1e-6)
    assert math.isclose(float(loss), (float((w0 * x).sum()) - t) ** 2, rel_tol=1e-6)


def test_mix_labels_and_phi():
    counts = torch.tensor([50, 20, 10, 5])
    from ltstudy.methods import MethodContext

    ctx = MethodContext(num_classes=4, class_counts=counts, epochs=10, device=torch.device("cpu"),
                        model_name="resnet32")
    m = FSGL(FSGLParams(fcc=1.0), ctx)
    b = 3
    batch = (torch.randn(b, 3, 8, 8), torch.randn(b, 3, 8, 8), torch.tensor([0, 1, 2]),
             torch.randn(b, 3, 8, 8), torch.randn(b, 3, 8, 8), torch.tensor([3, 3, 0]))
    torch.manual_seed(0)
    (x_mix, x_cut), (phi_mix, phi_cut), y, y_w = m.mix(batch)
    assert x_mix.shape == x_cut.shape == (b, 3, 8, 8)
    assert torch.allclose(y.sum(1), torch.ones(2 * b))
    assert torch.allclose(torch.cat([phi_mix, phi_cut]), y @ fsm_factors(counts, 1.0).float())
    w = label_weights(counts, 1.2).float()
    assert torch.allclose(y_w, y * w)  # y^w_k = y_k w_k for the two mixed classes
