import numpy as np
import pytest

from models.ranking.training import fit_with_epoch_selection


class _ScriptedModel:
    """Stands in for a compiled Keras model: each `fit` is one epoch whose weights are
    the epoch number, so the kept weights name the kept epoch."""

    def __init__(self, losses):
        self.losses, self.epoch, self.weights = list(losses), 0, [np.array(0)]

    def fit(self, ds, epochs, verbose):
        assert epochs == 1
        self.epoch += 1
        self.weights = [np.array(self.epoch)]

        class History:
            history = {"loss": [self.losses[self.epoch - 1]]}
        return History()

    def get_weights(self):
        return [w.copy() for w in self.weights]

    def set_weights(self, weights):
        self.weights = [w.copy() for w in weights]


def _run(curve, epochs, patience):
    model = _ScriptedModel([1.0] * epochs)
    values = iter(curve)
    out = fit_with_epoch_selection(model, None, epochs, lambda: next(values), patience=patience)
    return model, out


@pytest.mark.parametrize("patience, trained, kept", [
    (1, 3, 2),  # stops at the first epoch below the best (0.55 after 0.6)
    (2, 6, 4),  # the dip at epoch 3 is tolerated; epochs 5 and 6 both stay below 0.7
    (3, 7, 7),  # and with three, 0.9 at epoch 7 is reached
])
def test_patience_stops_after_that_many_epochs_without_improvement(patience, trained, kept):
    curve = [0.5, 0.6, 0.55, 0.7, 0.65, 0.66, 0.9]
    model, out = _run(curve, 7, patience)
    assert model.epoch == trained
    assert out["validation_auc"] == curve[:trained]
    assert out["epochs"] == kept
    assert int(model.weights[0]) == kept  # the best epoch's weights are restored


def test_without_validation_every_epoch_trains_and_the_last_is_kept():
    model = _ScriptedModel([0.5, 0.4, 0.3])
    out = fit_with_epoch_selection(model, None, 3, None, patience=1)
    assert model.epoch == 3 and int(model.weights[0]) == 3
    assert out["epochs"] == 3 and out["validation_auc"] == [] and out["train_loss"] == [0.5, 0.4, 0.3]


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_patience_is_validated(patience):
    with pytest.raises(ValueError, match="patience"):
        fit_with_epoch_selection(_ScriptedModel([1.0]), None, 1, None, patience=patience)


def test_non_finite_loss_names_the_epoch():
    model = _ScriptedModel([0.5, float("nan")])
    with pytest.raises(FloatingPointError, match="pre-ranker training diverged at epoch 2"):
        fit_with_epoch_selection(model, None, 2, None, what="pre-ranker")


def test_lower_is_better_keeps_the_epoch_of_lowest_score_under_its_name():
    curve = [0.9, 0.7, 0.75, 0.6, 0.65, 0.66]
    model = _ScriptedModel([1.0] * 6)
    values = iter(curve)
    out = fit_with_epoch_selection(model, None, 6, lambda: next(values), patience=2,
                                   score_name="validation_loss", higher_is_better=False)
    assert model.epoch == 6 and out["epochs"] == 4 and int(model.weights[0]) == 4
    assert out["validation_loss"] == curve and "validation_auc" not in out


def test_kept_epoch_is_the_one_whose_weights_are_restored_when_rounded_scores_tie():
    # 0.500001 and 0.500004 both round to 0.5: the kept epoch is still the better second one.
    values = iter([0.500001, 0.500004, 0.4])
    model = _ScriptedModel([1.0] * 3)
    out = fit_with_epoch_selection(model, None, 3, lambda: next(values), patience=1)
    assert out["epochs"] == 2 and int(model.weights[0]) == 2


def test_non_finite_validation_score_names_it_and_the_epoch():
    model = _ScriptedModel([0.5])
    with pytest.raises(FloatingPointError, match="pre-ranker validation_loss is nan at epoch 1"):
        fit_with_epoch_selection(model, None, 1, lambda: float("nan"), what="pre-ranker",
                                 score_name="validation_loss")
