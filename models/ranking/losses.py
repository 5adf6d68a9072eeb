"""Click losses from logits: binary cross-entropy, focal loss and GHM-C.

Every loss is a pure TensorFlow function returning per-example values plus a thin
`keras.losses.Loss` wrapper (the default Keras reduction averages over the batch).
Labels are click probabilities in [0, 1] (0/1 for impressions); predictions are logits.

GHM-C, precisely (Li, Liu, Wang, AAAI'19, Sec. 3-4):

* gradient norm of example i: ``g_i = |p_i − p*_i|`` with ``p_i = sigmoid(logit_i)`` (the
  norm of ∂BCE/∂logit), treated as a constant (no gradient flows through the weights);
* bins: the M unit regions ``[j/M, (j+1)/M)``, j = 0..M-1, the last one closed at 1
  (edges as in the reference implementation: ``g >= edge_j and g < edge_{j+1}``, with
  ``edge_M = 1 + 1e-6``); ``R_j`` = number of examples of the batch in bin j;
* moving average (momentum α, Sec. 4 "EMA"): ``S_j ← α S_j + (1 − α) R_j``, updated only
  for bins that are non-empty in the batch, starting from ``S_j = 0`` (so the first
  batches get larger weights until S warms up — the reference implementation's
  behaviour); with α = 0, ``S_j = R_j``;
* gradient density (unit-region approximation): ``GD(g) = S_{bin(g)} / ε`` with
  ``ε = 1/M``, i.e. ``S_{bin(g)} × M``; harmonizing weight ``β_i = N / GD(g_i)``;
  loss ``L = (1/N) Σ_i β_i · BCE_i``.

Normalization (`density_normalization`): the paper's formula divides by the bin width
ε = 1/M (``"num_bins"``: ``β = N / (S × M)``). The authors' released implementation
divides by the number n of *non-empty* bins of the batch instead (``"nonempty_bins"``:
``β = N / (S × n)``), which makes the mean weight exactly 1 without momentum
(Σ_j R_j · N / (R_j n) = N), keeping the loss on BCE's scale whatever M is. Default:
``"nonempty_bins"``. N counts every example of the batch.

Every call of `GHMCLoss` updates S (kept in a non-trainable variable): call it on
training batches only (compute validation metrics from predictions, not with this loss).
"""

from __future__ import annotations

from typing import Optional, Tuple

from models.tf_compat import keras, tf

DENSITY_NORMALIZATIONS = ("nonempty_bins", "num_bins")
_LAST_EDGE_SLACK = 1e-6


def _prepare(labels, logits) -> Tuple[tf.Tensor, tf.Tensor]:
    logits = tf.convert_to_tensor(logits)
    if not logits.dtype.is_floating:
        logits = tf.cast(logits, tf.float32)
    labels = tf.reshape(tf.cast(labels, logits.dtype), tf.shape(logits))
    return labels, logits


def binary_cross_entropy(labels, logits) -> tf.Tensor:
    """Per-example BCE from logits.

    Formula: ``BCE = −[y log σ(z) + (1 − y) log(1 − σ(z))] = max(z, 0) − z y + log(1 + e^{−|z|})``.

    Args:
      labels: ``[B]`` in [0, 1].
      logits: ``[B]``.

    Returns:
      ``[B]``.
    """
    labels, logits = _prepare(labels, logits)
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)


def focal_loss(labels, logits, alpha: Optional[float] = 0.25, gamma: float = 2.0) -> tf.Tensor:
    """Per-example binary focal loss from logits.

    Formula: ``FL = α_t (1 − p_t)^γ BCE`` with ``p_t = y σ(z) + (1 − y)(1 − σ(z))`` and
    ``α_t = y α + (1 − y)(1 − α)`` (``α_t = 1`` when `alpha` is None); γ = 0 and
    ``alpha=None`` give BCE.

    Args:
      labels: ``[B]`` in [0, 1].
      logits: ``[B]``.
      alpha: weight of the positive class in [0, 1], or None.
      gamma: focusing parameter >= 0.

    Returns:
      ``[B]``.

    References:
      Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    _check_focal_args(alpha, gamma)
    labels, logits = _prepare(labels, logits)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    p = tf.sigmoid(logits)
    p_t = labels * p + (1.0 - labels) * (1.0 - p)
    loss = tf.pow(1.0 - p_t, gamma) * bce if gamma != 0 else bce
    if alpha is not None:
        loss = (labels * alpha + (1.0 - labels) * (1.0 - alpha)) * loss
    return loss


def ghm_gradient_norm(labels, logits) -> tf.Tensor:
    """``g = |σ(z) − y|`` ``[B]``, without gradient."""
    labels, logits = _prepare(labels, logits)
    return tf.stop_gradient(tf.abs(tf.sigmoid(logits) - labels))


def ghm_bin_index(g, num_bins: int) -> tf.Tensor:
    """Bin of each gradient norm: j with ``edge_j <= g < edge_{j+1}``, edges ``j/M`` (last ``1 + 1e-6``).

    Args:
      g: ``[B]`` in [0, 1].

    Returns:
      ``[B]`` int32 in ``[0, num_bins)``.
    """
    _check_num_bins(num_bins)
    g = tf.convert_to_tensor(g)
    edges = tf.range(num_bins + 1, dtype=g.dtype) / tf.cast(num_bins, g.dtype)
    edges = tf.tensor_scatter_nd_add(edges, [[num_bins]], tf.constant([_LAST_EDGE_SLACK], g.dtype))
    index = tf.searchsorted(edges, tf.reshape(g, [-1]), side="right") - 1
    return tf.reshape(tf.clip_by_value(index, 0, num_bins - 1), tf.shape(g))


def ghm_c_weights(g, accumulated, num_bins: int = 30, momentum: float = 0.75,
                  density_normalization: str = "nonempty_bins") -> Tuple[tf.Tensor, tf.Tensor]:
    """Harmonizing weights ``β_i = N / GD(g_i)`` and the updated bin statistics.

    Args:
      g: ``[B]`` gradient norms (`ghm_gradient_norm`).
      accumulated: ``[num_bins]`` moving-average bin counts S before this batch.
      num_bins: M.
      momentum: α in [0, 1); 0 uses this batch's counts only.
      density_normalization: ``"nonempty_bins"`` (reference implementation) or
        ``"num_bins"`` (paper's formula), see the module docstring.

    Returns:
      ``(weights [B], accumulated [num_bins])``; S is unchanged for empty bins.
    """
    _check_ghm_args(num_bins, momentum, density_normalization)
    g = tf.convert_to_tensor(g)
    dtype = g.dtype if g.dtype.is_floating else tf.float32
    index = ghm_bin_index(tf.cast(g, dtype), num_bins)
    flat = tf.reshape(index, [-1])
    counts = tf.math.bincount(flat, minlength=num_bins, maxlength=num_bins, dtype=dtype)
    accumulated = tf.cast(tf.convert_to_tensor(accumulated), dtype)
    nonempty = counts > 0
    if momentum > 0:
        accumulated = tf.where(nonempty, momentum * accumulated + (1.0 - momentum) * counts, accumulated)
        density_counts = accumulated
    else:
        accumulated = counts
        density_counts = counts
    total = tf.cast(tf.size(flat), dtype)
    if density_normalization == "nonempty_bins":
        bins_used = tf.maximum(tf.reduce_sum(tf.cast(nonempty, dtype)), 1.0)
    else:
        bins_used = tf.cast(num_bins, dtype)
    weights = total / (tf.gather(density_counts, index) * bins_used)
    return tf.stop_gradient(weights), accumulated


def ghm_c_loss(labels, logits, weights) -> tf.Tensor:
    """Per-example harmonized BCE ``β_i · BCE_i`` ``[B]`` (its batch mean is L_GHM-C).

    Formula: ``L_GHM-C = (1/N) Σ_i β_i BCE_i``.

    References:
      Li, Liu, Wang, "Gradient Harmonized Single-stage Detector", AAAI 2019.
    """
    bce = binary_cross_entropy(labels, logits)
    return tf.stop_gradient(tf.cast(weights, bce.dtype)) * bce


def _check_focal_args(alpha, gamma) -> None:
    if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` should be in [0, 1] or None. Received: alpha={alpha!r}")
    if not float(gamma) >= 0.0:
        raise ValueError(f"`gamma` should be >= 0. Received: gamma={gamma!r}")


def _check_num_bins(num_bins) -> None:
    if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"`num_bins` should be a positive integer. Received: num_bins={num_bins!r}")


def _check_ghm_args(num_bins, momentum, density_normalization) -> None:
    _check_num_bins(num_bins)
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"`momentum` should be in [0, 1). Received: momentum={momentum!r}")
    if density_normalization not in DENSITY_NORMALIZATIONS:
        raise ValueError(f"`density_normalization` should be one of {DENSITY_NORMALIZATIONS}. "
                         f"Received: density_normalization={density_normalization!r}")


# ---------------------------------------------------------------------------------
# Keras wrappers.
# ---------------------------------------------------------------------------------
@keras.utils.register_keras_serializable(package="recfunnel")
class BinaryCrossEntropy(keras.losses.Loss):
    """BCE from logits (see `binary_cross_entropy`).

    Formula: ``mean_i BCE(y_i, z_i)``.
    """

    def __init__(self, reduction=keras.losses.Reduction.AUTO, name: str = "binary_cross_entropy"):
        super().__init__(reduction=reduction, name=name)

    def call(self, y_true, y_pred):
        return binary_cross_entropy(y_true, y_pred)


@keras.utils.register_keras_serializable(package="recfunnel")
class FocalLoss(keras.losses.Loss):
    """Binary focal loss from logits (see `focal_loss`).

    Formula: ``mean_i α_t (1 − p_t)^γ BCE_i``.

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
    """

    def __init__(self, alpha: Optional[float] = 0.25, gamma: float = 2.0,
                 reduction=keras.losses.Reduction.AUTO, name: str = "focal_loss"):
        _check_focal_args(alpha, gamma)
        super().__init__(reduction=reduction, name=name)
        self.alpha = None if alpha is None else float(alpha)
        self.gamma = float(gamma)

    def call(self, y_true, y_pred):
        return focal_loss(y_true, y_pred, self.alpha, self.gamma)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "gamma": self.gamma}


@keras.utils.register_keras_serializable(package="recfunnel")
class GHMCLoss(keras.losses.Loss):
    """Gradient-harmonized BCE (GHM-C) from logits with moving-average bin counts.

    Each call bins the batch's gradient norms, updates the moving-average counts S (a
    non-trainable variable, `accumulated`), and returns ``β_i · BCE_i``; the default
    reduction averages them: ``L = Σ_i β_i BCE_i / N``. See the module docstring for the
    exact density and normalization. A ``sample_weight`` multiplies ``β_i · BCE_i``;
    every example counts in the density.

    Formula: ``L = (1/N) Σ_i N / GD(g_i) · BCE_i``, ``GD(g) = S_{bin(g)} × (n or M)``.

    Args:
      num_bins: M (default 30).
      momentum: α of the moving average (default 0.75; 0 disables it).
      density_normalization: ``"nonempty_bins"`` (default) or ``"num_bins"``.

    References:
      Li, Liu, Wang, "Gradient Harmonized Single-stage Detector", AAAI 2019.
    """

    def __init__(self, num_bins: int = 30, momentum: float = 0.75,
                 density_normalization: str = "nonempty_bins",
                 reduction=keras.losses.Reduction.AUTO, name: str = "ghm_c_loss"):
        _check_ghm_args(num_bins, momentum, density_normalization)
        super().__init__(reduction=reduction, name=name)
        self.num_bins = int(num_bins)
        self.momentum = float(momentum)
        self.density_normalization = density_normalization
        self.accumulated = tf.Variable(tf.zeros([self.num_bins], tf.float32), trainable=False,
                                       name="ghm_accumulated_bin_counts")

    def call(self, y_true, y_pred):
        y_true, y_pred = _prepare(y_true, y_pred)
        g = ghm_gradient_norm(y_true, y_pred)
        weights, accumulated = ghm_c_weights(g, self.accumulated, self.num_bins, self.momentum,
                                             self.density_normalization)
        self.accumulated.assign(tf.cast(accumulated, tf.float32))
        return ghm_c_loss(y_true, y_pred, weights)

    def reset_state(self) -> None:
        self.accumulated.assign(tf.zeros_like(self.accumulated))

    def get_config(self):
        return {**super().get_config(), "num_bins": self.num_bins, "momentum": self.momentum,
                "density_normalization": self.density_normalization}


def make_loss(name: str, **kwargs) -> keras.losses.Loss:
    """``"bce"``, ``"focal"`` or ``"ghm"`` → the loss object (kwargs go to its constructor)."""
    losses = {"bce": BinaryCrossEntropy, "focal": FocalLoss, "ghm": GHMCLoss}
    if name not in losses:
        raise ValueError(f"`loss` should be one of {tuple(losses)}. Received: loss={name!r}")
    return losses[name](**kwargs)
