import numpy as np
import pytest

from models.ranking.metrics import auc, calibration, ctr_metrics, gauc, log_loss


def _pairwise_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


def test_auc_by_hand_with_ties():
    # Pairs (pos, neg): (0.8, 0.3) win, (0.8, 0.5) win, (0.5, 0.3) win, (0.5, 0.5) tie -> 3.5 / 4.
    assert auc([1, 0, 1, 0], [0.8, 0.3, 0.5, 0.5]) == pytest.approx(0.875)
    assert auc([0, 1], [2.0, 1.0]) == 0.0
    assert auc([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0]) == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_gauc_against_pairwise_counting(seed):
    rng = np.random.default_rng(seed)
    n = 400
    users = rng.integers(0, 25, size=n)
    y = (rng.random(n) < 0.3).astype(float)
    s = np.round(rng.normal(size=n) + y, 1)  # rounding makes many ties
    assert auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)
    num, den, counted = 0.0, 0.0, 0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * _pairwise_auc(y[m], s[m])
            den += m.sum()
            counted += 1
    got = gauc(users.astype(str), y, s)
    assert got["gauc"] == pytest.approx(num / den, abs=1e-12)
    assert got["users"] == counted and got["impressions"] == den


def test_gauc_skips_single_class_users():
    # u1: one pair won -> 1.0 (2 impressions); u2: only clicks -> skipped; u3: lost -> 0.0 (2 impressions).
    got = gauc(["u1", "u1", "u2", "u3", "u3"], [1, 0, 1, 1, 0], [0.9, 0.1, 0.5, 0.2, 0.7])
    assert got == {"gauc": 0.5, "users": 2, "impressions": 4}
    assert np.isnan(gauc(["a", "b"], [1, 0], [0.1, 0.2])["gauc"])


def test_log_loss_and_calibration_by_hand():
    # -(log .8 + log(1 - .4)) / 2
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert np.isfinite(log_loss([1, 0], [0.0, 1.0]))  # clipped
    # predictions .1 .1 .6 .9, clicks 0 0 1 1: predicted CTR .425, observed .5, ratio .85.
    # 2 bins: [0, .5): two rows, mean p .1, rate 0; [.5, 1]: mean p .75, rate 1.
    # ECE = 2/4 * .1 + 2/4 * .25 = .175.
    cal = calibration([0, 0, 1, 1], [0.1, 0.1, 0.6, 0.9], num_bins=2)
    assert cal["ratio"] == pytest.approx(0.85)
    assert cal["ece"] == pytest.approx(0.175)
    assert [b["count"] for b in cal["bins"]] == [2, 2]
    assert cal["bins"][1]["mean_predicted"] == pytest.approx(0.75)
    assert cal["bins"][1]["observed_rate"] == 1.0
    assert calibration([1], [1.0], num_bins=4)["bins"][3]["count"] == 1  # 1.0 is in the last bin


@pytest.mark.parametrize("seed", range(3))
def test_calibrated_predictions_have_ratio_near_one(seed):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.05, 0.6, size=20000)
    y = (rng.random(20000) < p).astype(float)
    cal = calibration(y, p)
    assert cal["ratio"] == pytest.approx(1.0, abs=0.03)
    assert cal["ece"] < 0.03
    assert sum(b["count"] for b in cal["bins"]) == 20000
    m = ctr_metrics(rng.integers(0, 50, 20000), y, p)
    assert 0.5 < m["auc"] < 1 and m["gauc_users"] == 50


def test_ctr_metrics_by_hand():
    # Users a (clicks 1 0, p .85 .45) and b (clicks 1 0 0, p .25 .65 .15).
    # AUC: .85 beats all 3 non-clicks, .25 beats only .15 -> 4/6.  GAUC: a 1.0 (2 rows), b 1/2 (3 rows) -> 3.5/5.
    # log loss = -(log .85 + log .55 + log .25 + log .35 + log .85) / 5.
    # Ratio: predicted CTR 2.35/5 = .47, observed 2/5 = .4 -> 1.175.
    # ECE over 10 bins, one row each: (|.85-1| + .45 + |.25-1| + .65 + .15) / 5 = 2.15 / 5 = .43.
    users, y, p = ["a", "a", "b", "b", "b"], [1, 0, 1, 0, 0], [0.85, 0.45, 0.25, 0.65, 0.15]
    m = ctr_metrics(users, y, p)
    assert m == pytest.approx({"auc": 4 / 6, "gauc": 0.7, "gauc_users": 2,
                               "log_loss": -np.log([0.85, 0.55, 0.25, 0.35, 0.85]).mean(),
                               "calibration_ratio": 1.175, "ece": 0.43})
    cal = calibration(y, p)
    assert (m["log_loss"], m["calibration_ratio"], m["ece"]) == (log_loss(y, p), cal["ratio"], cal["ece"])


def test_metric_errors_name_the_argument():
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels"):
        auc([1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores"):
        auc([1, 0], [0.1])
    with pytest.raises(ValueError, match="probabilities"):
        log_loss([1, 0], [0.5, 1.5])
    with pytest.raises(ValueError, match="num_bins"):
        calibration([1], [0.5], num_bins=0)
