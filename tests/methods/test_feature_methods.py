"""TailCalib generation, DLSA flow density, FSA Grad-CAM/fusion on toy cases; each feature method end to end."""

from __future__ import annotations

import math

import pytest
import torch

from ltstudy.config import resolve_config
from ltstudy.methods.dlsa import FlowGMM
from ltstudy.methods.fsa import confusing_classes, fuse, grad_cam, head_classes
from ltstudy.methods.tailcalibx import generate_features, spawn_counts
from ltstudy.train import TrialContext, run_trial


# -- TailCalib ---------------------------------------------------------------------------------------
def test_spawn_counts_fill_every_class_to_the_largest():
    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 1)
    k = spawn_counts(y, 3, extra_points=2, generator=torch.Generator().manual_seed(0))
    per_class = torch.zeros(3, dtype=torch.long).index_add_(0, y, k)
    assert per_class.tolist() == [2, 9, 11]
    assert k[10:13].max() - k[10:13].min() <= 1


def test_generated_features_have_the_calibrated_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    # class 0: 4000 points uniform in a box around (2, 0); class 1: two points near the origin
    x0 = torch.rand(4000, 2, generator=g) * torch.tensor([1.0, 0.5]) + torch.tensor([2.0, 0.0])
    x1 = torch.tensor([[0.4, 0.5], [0.6, 0.5]])
    x, y = torch.cat([x0, x1]), torch.cat([torch.zeros(4000, dtype=torch.long), torch.ones(2, dtype=torch.long)])
    alpha = 0.05
    gx, gy = generate_features(x, y, 2, tukey_lambda=1.0, alpha=alpha, topk=2, alpha_form="diagonal", generator=g)
    gen = gx[4002:]
    assert (gy[4002:] == 1).all() and len(gen) == 3998
    # by hand: μ' = (μ0 + μ1 + x)/3 averaged over the two spawning samples; Σ' = (Σ0 + Σ1)/2 + (α + 1e-4) I
    mu0, mu1 = x0.double().mean(0), x1.double().mean(0)
    expected_mean = (mu0 + mu1 + mu1) / 3
    cov1 = torch.tensor([[0.02, 0.0], [0.0, 0.0]], dtype=torch.float64)  # unbiased cov of the two points
    expected_cov = (torch.cov(x0.double().T) + cov1) / 2 + (alpha + 1e-4) * torch.eye(2, dtype=torch.float64)
    # the two sources have different means (±0.1/3 in x), which adds their between-source variance
    expected_cov[0, 0] += (0.1 / 3) ** 2
    assert torch.allclose(gen.double().mean(0), expected_mean, atol=0.02)
    assert torch.allclose(torch.cov(gen.double().T), expected_cov, atol=0.01)


@pytest.mark.parametrize("form", ["all", "diagonal"])
def test_alpha_is_added_to_every_entry_or_to_the_diagonal(form):
    """The reference adds α to every covariance entry (variance α·D along the all-ones direction);
    ``alpha_form="diagonal"`` adds α·I."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.zeros(3000, 2) + 5, torch.tensor([[1.0, 1.0]])])
    y = torch.cat([torch.zeros(3000, dtype=torch.long), torch.ones(1, dtype=torch.long)])
    gen = generate_features(x, y, 2, alpha=0.5, topk=1, alpha_form=form, generator=g)[0][3001:]
    cov = torch.cov(gen.double().T)
    assert abs(cov[0, 0] - 0.5001) < 0.05 and abs(cov[1, 1] - 0.5001) < 0.05
    assert abs(cov[0, 1] - (0.5 if form == "all" else 0.0)) < 0.05


def test_statistics_are_built_once_and_only_drawn_points_are_generated(monkeypatch, synthetic_backbone,
                                                                      synthetic_store):
    """TailCalibX's statistics do not change while its features do not: built once in a 3-epoch trial; an
    epoch generates only the points its N / batch steps draw, not the whole balanced set."""
    from ltstudy.methods import tailcalibx

    builds, drawn = [], []
    real_build, real_draw = tailcalibx.Calibration.build.__func__, tailcalibx.Calibration.draw
    monkeypatch.setattr(tailcalibx.Calibration, "build",
                        classmethod(lambda cls, *a, **k: builds.append(1) or real_build(cls, *a, **k)))
    monkeypatch.setattr(tailcalibx.Calibration, "draw",
                        lambda self, src, *a, **k: drawn.append(len(src)) or real_draw(self, src, *a, **k))
    cfg = resolve_config({"method": "tailcalibx", "dataset": "synthetic", "image_size": 32, "epochs": 3,
                          "device": "cpu", "backbone": synthetic_backbone, "feature_storage": synthetic_store,
                          "batch_size": 64})
    run_trial(cfg)
    assert builds == [1]
    n = 200 + sum(int(200 * 100 ** (-i / 9)) for i in range(1, 10))  # the synthetic train split
    per_epoch = (n // 64) * 64
    assert sum(drawn) <= 3 * per_epoch < 3 * (10 * 200) and sum(drawn) > 0


def test_alpha_in_trace_units_is_the_total_variance_added():
    from ltstudy.methods.tailcalibx import TailCalibX, TailCalibXParams

    method = TailCalibX(TailCalibXParams(alpha=0.3, alpha_units="trace"), None)
    method.feats = type("F", (), {"feature_dim": 64})()
    assert method.alpha == pytest.approx(0.3 / 64)
    method.p = TailCalibXParams(alpha=0.3)
    assert method.alpha == 0.3


# -- DLSA --------------------------------------------------------------------------------------------
def test_flow_log_likelihood_equals_the_analytic_gaussian_mixture():
    torch.manual_seed(0)
    d, k = 3, 4
    flow = FlowGMM(d, k, n_blocks=2, center_std=0.5)
    for made in flow.layers[::2]:  # identity MADE: last layer zero → m = 0, log a = 0
        torch.nn.init.zeros_(made.net[-1].weight)
        torch.nn.init.zeros_(made.net[-1].bias)
    bn_last = flow.layers[-1]
    mean, var = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([4.0, 0.25, 1.0])
    bn_last.running_mean.copy_(mean)
    bn_last.running_var.copy_(var - bn_last.eps)
    flow.eval()  # u = (x − mean)/sqrt(var) after the first (unit) BN: x ~ mixture of N(mean + s·μ_k, var)
    first = flow.layers[1]
    x = torch.randn(50, d) * 2
    s1 = torch.sqrt(first.running_var + first.eps)
    comp = torch.distributions.Independent(
        torch.distributions.Normal(mean + torch.sqrt(var) * flow.means * 1.0, torch.sqrt(var).expand(k, d)), 1)
    # x passes BN1 (divide by s1) then BN2: density picks up the 1/s1 Jacobian of the first layer
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(torch.ones(k)), comp)
    expected = mix.log_prob(x / s1) - torch.log(s1).sum()
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-4)


def test_flow_likelihood_rises_during_training():
    torch.manual_seed(0)
    x = torch.randn(512, 4) * torch.tensor([3.0, 0.5, 1.0, 2.0]) + 1.0
    flow = FlowGMM(4, 8)
    opt = torch.optim.SGD(flow.parameters(), lr=0.05)
    flow.eval()
    before = flow.log_prob(x).mean().item()
    flow.train()
    for _ in range(200):
        loss = -flow.log_prob(x[torch.randint(512, (128,))]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()
    after = flow.log_prob(x).mean().item()
    assert math.isfinite(after) and after > before + 0.5


def test_a_diverging_flow_fails_the_trial(tiny_backbone, tmp_path):
    """A non-finite flow no longer routes nothing and quietly trains Balanced Softmax: the trial fails."""
    from ltstudy.errors import NonFiniteLossError

    from support.configs import tiny_config

    cfg = tiny_config("dlsa", tiny_backbone, feature_storage=str(tmp_path), num_cluster=8, flow_epochs=2,
                      flow_batch_size=64, flow_lr=1e12)
    with pytest.raises(NonFiniteLossError, match="flow"):
        run_trial(cfg)


# -- FSA ---------------------------------------------------------------------------------------------
def test_grad_cam_matches_autograd_and_a_hand_case():
    maps = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[0.0, 3.0], [1.0, 0.0]]]])  # (1, 2, 2, 2)
    w = torch.tensor([[1.0, 0.5], [-1.0, 1.0]])
    cam = grad_cam(maps, w, torch.tensor([0]))
    # Σ_k w_0k A_k = [[1, 1.5], [0.5, 2]] → min-max: [[1/3, 2/3], [0, 1]]
    assert torch.allclose(cam[0], torch.tensor([[1 / 3, 2 / 3], [0.0, 1.0]]))
    a = maps.clone().requires_grad_(True)
    fc = torch.nn.Linear(2, 2)
    fc.weight.data.copy_(w)
    fc(a.mean((2, 3)))[0, 1].backward()
    weights = a.grad.mean((2, 3))  # Grad-CAM channel weights
    ref = torch.relu((weights[:, :, None, None] * maps).sum(1))
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    assert torch.allclose(grad_cam(maps, w, torch.tensor([1])), ref)
    assert torch.equal(grad_cam(torch.ones(1, 2, 1, 1), w, torch.tensor([0])), torch.zeros(1, 1, 1))


def test_fusion_and_confusing_classes():
    tail = torch.full((1, 1, 2, 2), 10.0)
    gen = torch.full((1, 1, 2, 2), 1.0)
    tcam = torch.tensor([[[0.9, 0.1], [0.95, 0.5]]])
    gcam = torch.tensor([[[0.1, 0.1], [0.9, 0.0]]])
    u = torch.tensor([[[0.9, 0.9], [0.1, 0.1]]])
    out = fuse(tail, tcam, gen, gcam, ts=0.8, tg=0.2, gamma=torch.tensor([0.5]), u=u)
    # top row from the tail's specific part (10 where cam > .8 else 0), bottom from the generic part
    assert torch.equal(out[0, 0], torch.tensor([[10.0, 0.0], [0.0, 1.0]]))
    counts = torch.tensor([100, 50, 10, 5])
    head = head_classes(counts, 0.9)
    assert head.tolist() == [True, True, False, False]
    s = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.3, 0.6, 0.05, 0.05], [0.1, 0.5, 0.4, 0.0], [0.6, 0.1, 0.3, 0.0]])
    conf = confusing_classes(s, head, 1)
    assert conf[:, 0].tolist() == [1, 0, 1, 0]  # row t: class 2 is confused with 1, class 3 with 0


def _reference_cifar100_head(counts: list[int], ratio: float) -> set[int]:
    """SSRSGJYD/... datasets/cifar_lt.py Cifar100LTDataset: class 0, then classes in index order while the
    running total stays within ratio of all samples."""
    head, total, running = {0}, sum(counts), 0
    for i, n in enumerate(counts):
        running += n
        if running > total * ratio:
            break
        head.add(i)
    return head


def _reference_imagenet_head(counts: list[int], ratio: float) -> set[int]:
    """datasets/imagenet_lt.py: classes by count, descending, each added before the share test."""
    head, total, running = set(), sum(counts), 0
    for c in sorted(range(len(counts)), key=lambda c: -counts[c]):
        running += counts[c]
        head.add(c)
        if running / total >= ratio:
            break
    return head


def test_head_classes_follow_the_references_rule_per_dataset():
    from ltstudy.data import lt_counts
    from ltstudy.methods import get_method

    c10 = torch.tensor(lt_counts(5000, 10, 100))
    seven = head_classes(c10, 0.9, "count", 7)
    assert seven.tolist() == [True] * 7 + [False] * 3 and int(c10[~seven].sum()) == 272  # the reference's 0-6
    assert int(c10[~head_classes(c10, 0.9, "reach")].sum()) == 891  # what a 0.9 share picks instead
    c100 = lt_counts(500, 100, 100)
    within = head_classes(torch.tensor(c100), 0.9, "within")
    assert set(within.nonzero().flatten().tolist()) == _reference_cifar100_head(c100, 0.9)
    shuffled = [c100[i] for i in torch.randperm(100, generator=torch.Generator().manual_seed(0)).tolist()]
    reach = head_classes(torch.tensor(shuffled), 0.9, "reach")
    assert set(reach.nonzero().flatten().tolist()) == _reference_imagenet_head(shuffled, 0.9)
    rules = {f: get_method("fsa").recipe(f).settings["head_rule"] for f in ("cifar10", "cifar100", "imagenet")}
    assert rules == {"cifar10": "count", "cifar100": "within", "imagenet": "reach"}


# -- end to end on a tiny backbone -------------------------------------------------------------------
@pytest.mark.parametrize("name,extra", [
    ("ce_classifier", {}),
    ("tailcalibx", {"augmented_views": 1}),
    ("tailcalibx", {"regenerate": False, "stats_after_tukey": False, "tukey": 0.5}),
    # this 1-epoch backbone's features reach norms of 500-1,600 (eval-mode BN with barely estimated running
    # statistics; how far depends on the machine's float reductions), and the published flow_lr 0.2 (in a new
    # venv even 1e-3) makes the depth-2 flow NaN on its own samples: that used to pass silently as Balanced
    # Softmax alone, it now fails the trial (test_a_diverging_flow_fails_the_trial)
    ("dlsa", {"num_cluster": 20, "flow_epochs": 3, "max_depth": 2, "flow_lr": 1e-4}),
    ("fsa", {}),
])
def test_feature_method_end_to_end(name, extra, synthetic_backbone, synthetic_store, tmp_path):
    cfg = resolve_config({"method": name, "dataset": "synthetic", "image_size": 32, "epochs": 2,
                          "device": "cpu", "backbone": synthetic_backbone,
                          "feature_storage": synthetic_store, **extra})
    reports = []
    metrics = run_trial(cfg, lambda m, c: reports.append(m), TrialContext(checkpoint_dir=str(tmp_path)))
    assert [r["epoch"] for r in reports] == [1, 2]
    for key in ("train_loss", "val_top1", "val_loss", "test_top1", "test_loss"):
        assert math.isfinite(metrics[key]), key
    assert len(metrics["test_per_class"]) == 10 and "test_top1" not in reports[0]


def test_a_preset_feature_key_is_checked_against_the_trial(tiny_backbone, tmp_path):
    """A trial given a cache key still has its data and extraction options checked against the manifest (a
    TailCalibX trial with augmented views no longer runs on a cache without them)."""
    from ltstudy.errors import ConfigError
    from ltstudy.train.feature import resolve_features

    from support.configs import tiny_config

    store = str(tmp_path)
    _, key = resolve_features(tiny_config("ce_classifier", tiny_backbone, feature_storage=store))
    preset = {"feature_storage": store, "feature_key": key}
    with pytest.raises(ConfigError, match="augmented_views=0, the trial asks for 1"):
        run_trial(tiny_config("tailcalibx", None, augmented_views=1, **preset))
    with pytest.raises(ConfigError, match="no feature maps"):
        run_trial(tiny_config("fsa", None, **preset))
    with pytest.raises(ConfigError, match="imbalance=20.0, the trial has imbalance=10.0"):
        run_trial(tiny_config("ce_classifier", None, imbalance=10, **preset))
    assert math.isfinite(run_trial(tiny_config("ce_classifier", None, **preset))["test_top1"])
