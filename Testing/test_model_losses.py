import math

import numpy as np
import pytest
import torch
from refnet.losses import RefNetLoss
from refnet.model import RefNet, RefNetConfig

TINY = (4, 4, 8, 8, 16, 4)


@pytest.mark.parametrize(("context", "ct_channels"), [(0, 0), (1, 0), (2, 1)])
def test_refnet_shapes_and_identity_start(context, ct_channels):
    net = RefNet(RefNetConfig(features=TINY, context=context, ct_channels=ct_channels)).eval()
    labels = torch.randint(0, 13, (2, 2 * context + 1, 32, 48))
    ct = torch.rand(2, ct_channels, 32, 48) if ct_channels else None
    logits = net(labels, ct)
    assert logits.shape == (2, 13, 32, 48)
    # Zero-initialised last layer + scaled one-hot: the untrained net returns its centre slice.
    assert torch.equal(logits.argmax(1), labels[:, context])


def test_refnet_without_identity_is_not_identity():
    torch.manual_seed(0)
    net = RefNet(RefNetConfig(features=TINY, identity_scale=0.0)).eval()
    labels = torch.randint(0, 13, (1, 3, 32, 32))
    assert not torch.equal(net(labels).argmax(1), labels[:, 1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_classes": 1}, "num_classes must be >= 2, got 1"), ({"embed_dim": 0}, "embed_dim"),
     ({"context": -1}, "context"), ({"features": (1, 2)}, "6 sizes")],
)
def test_refnet_config_ill_opts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefNetConfig(**kwargs)


def test_refnet_input_checks():
    net = RefNet(RefNetConfig(features=TINY, ct_channels=1))
    with pytest.raises(ValueError, match="expected 3 label slices"):
        net(torch.zeros(1, 1, 16, 16, dtype=torch.long), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="needs 1 CT channel"):
        net(torch.zeros(1, 3, 16, 16, dtype=torch.long))


def _hand_ce(logits, target):
    total = 0.0
    for b in range(logits.shape[0]):
        for h in range(logits.shape[2]):
            for w in range(logits.shape[3]):
                z = logits[b, :, h, w]
                total += math.log(sum(math.exp(v) for v in z)) - z[target[b, h, w]]
    return total / (logits.shape[0] * logits.shape[2] * logits.shape[3])


def _hand_dice_loss(logits, target, eps=1e-5):
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    onehot = np.eye(logits.shape[1])[target].transpose(0, 3, 1, 2)
    inter = (p * onehot).sum((0, 2, 3))
    denom = p.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return float(np.mean(1 - (2 * inter + eps) / (denom + eps)))


def test_loss_terms_match_hand_computed_values():
    logits = np.array([[[[2.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.5]]]])  # (1, 3, 1, 2)
    gt = np.array([[[0, 1]]])
    raw = np.array([[[0, 2]]])
    loss = RefNetLoss()
    t = loss.terms(torch.tensor(logits), torch.tensor(gt), torch.tensor(raw))
    assert float(t["ce_gt"]) == pytest.approx(_hand_ce(logits, gt), rel=1e-6)
    assert float(t["ce_raw"]) == pytest.approx(_hand_ce(logits, raw), rel=1e-6)
    assert float(t["dice_gt"]) == pytest.approx(_hand_dice_loss(logits, gt), rel=1e-5)
    total = float(RefNetLoss(raw_weight=0.5, dice_weight=2.0)(torch.tensor(logits), torch.tensor(gt),
                                                              torch.tensor(raw)))
    expected = _hand_ce(logits, gt) + 2.0 * _hand_dice_loss(logits, gt) + 0.5 * _hand_ce(logits, raw)
    assert total == pytest.approx(expected, rel=1e-5)


def test_loss_class_weights_change_ce():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])
    gt = torch.tensor([[[0, 1]]])
    plain = RefNetLoss().terms(logits, gt, gt)["ce_gt"]
    weighted = RefNetLoss(class_weights=[0.0, 1.0]).terms(logits, gt, gt)["ce_gt"]
    z = logits[0, :, 0, 1]
    assert float(weighted) == pytest.approx(float(torch.logsumexp(z, 0) - z[1]), rel=1e-6)
    assert float(weighted) != pytest.approx(float(plain))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"raw_weight": -1}, "loss weights must be >= 0"), ({"class_weights": [[1.0]]}, "1D sequence")],
)
def test_loss_ill_opts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefNetLoss(**kwargs)


def test_loss_shape_check():
    with pytest.raises(ValueError, match=r"expected logits \(B, C, H, W\)"):
        RefNetLoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long),
                     torch.zeros(1, 4, 5, dtype=torch.long))


def test_batch_dice_ce_is_monais_loss_and_its_sharded_form_the_same_numbers():
    from monai.losses import DiceCELoss
    from refnet.losses import BatchDiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(4, 13, 6, 7, 5, requires_grad=True)
    target = torch.randint(0, 13, (4, 1, 6, 7, 5))
    expected = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(logits, target)
    assert torch.equal(BatchDiceCELoss(1)(logits, target), expected)  # one process: MONAI's loss itself
    sharded = BatchDiceCELoss(2).sharded(logits, target, all_reduce=lambda t: t)  # the whole batch as one share
    assert float(sharded.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    grad_monai, = torch.autograd.grad(expected, logits)
    grad_sharded, = torch.autograd.grad(sharded, logits)
    torch.testing.assert_close(grad_sharded, grad_monai)
