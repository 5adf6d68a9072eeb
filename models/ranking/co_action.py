"""The co-action unit of CAN: an item-generated micro-MLP applied to user-side embeddings.

CAN models the co-action of a user-side feature (the *feed*) and an item-side feature
(the *induction*) without a Cartesian-product id: the induction feature's co-action
embedding ``P_induction`` is not used as a vector but reshaped into the weights and
biases of a small MLP (``MLP_can``), and the feed feature's co-action embedding
``P_feed`` is passed through it:

    |P_induction| = Σ_{i=1..L} (|w_i| + |b_i|)                              (Eq. 6)
    h_0 = P_feed,  h_i = σ(h_{i-1} w_i + b_i),  i = 1..L                  (Eq. 4-5)
    H(P_feed, P_induction) = concat(h_1, ..., h_L)

where ``w_i`` is ``[d_{i-1}, d_i]`` with ``d_0 = D = |P_feed|``. As in the authors' code,
σ = tanh after every layer but the last, and the outputs of all layers are
concatenated (the last layer alone in the paper's Eq. 5; the hidden outputs are extra
signal the following DNN can ignore).

Behaviour sequence (Eq. 10, a switch): ``"coaction_then_sum"`` applies the unit to each
item of the sequence and sum-pools the outputs over the non-padding positions (the
authors' code), ``"sum_then_coaction"`` sum-pools the sequence first and applies the
unit once (cheaper, but co-actions of different items mix before the non-linearity).
``"coaction_then_mean"`` and ``"mean_then_coaction"`` average over the real positions
instead of summing (an empty sequence gives zeros / the unit of a zero feed, as with
sums): a sum grows with the history's length, a mean is a share of it, which is what a
"how much of the history is like the target" effect needs.

Multi-order enhancement (Eq. 8): the unit is applied to the element-wise powers
``P_feed^c``, c = 1..C; tanh bounds the hidden outputs against the numerical growth of
high orders. The paper sums the C outputs; the authors' code concatenates them
(``combine_orders="concat"``, default; the DNN above can form the sum), ``"sum"``
follows the formula.

Independence levels (Sec. 3.3):

* parameter independence (always): the co-action embeddings are tables of their own,
  separate from the representation embeddings (the models own them);
* combination independence: each (induction, feed) pair gets its own slice of
  ``P_induction`` (its length is multiplied by the number of feeds);
* order independence: each order c gets its own micro-MLP (length multiplied by C).

Layout of ``P_induction`` (outermost first): feed j (if combination independent) →
order c (if order independent) → layer i → ``w_i`` (row-major ``[d_{i-1}, d_i]``) then
``b_i``.

Cost: the micro-MLPs differ per example, so a literal implementation is one tiny matmul
per (example, induction feature, layer), whose count, not size, dominates on CPU.
`co_action_feeds` computes the same values with few large operations: the rows of every
feed, position and order are stacked, the first layer of all I induction features is one
``[rows, D + 1] × [D + 1, I·d_1]`` matmul per example (bias folded in), pooling is a matmul
with the positions' weights, and the last (linear) layer runs after pooling, on one row
per (feed, order) instead of one per position. `split_induction` and `micro_mlp` keep the
literal per-row form.

References:
  Bian, Wang, Zhou et al., "CAN: Feature Co-Action for Click-Through Rate Prediction",
  WSDM 2022 (arXiv:2011.05625).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

from models.tf_compat import keras, tf

SEQUENCE_POOLINGS = ("coaction_then_sum", "sum_then_coaction", "coaction_then_mean", "mean_then_coaction")
ORDER_COMBINATIONS = ("concat", "sum")

MicroMLPParams = List[Tuple[tf.Tensor, Optional[tf.Tensor]]]

# The functions below only loop over static Python values (layers, orders, feeds):
# AutoGraph has nothing to convert in them, so they run as plain Python when traced.
_plain_python = tf.autograph.experimental.do_not_convert


# ---------------------------------------------------------------------------------
# Pure functions.
# ---------------------------------------------------------------------------------
def _check_layer_sizes(input_dim: int, layer_sizes: Sequence[int]) -> Tuple[int, Tuple[int, ...]]:
    if isinstance(input_dim, bool) or int(input_dim) != input_dim or input_dim < 1:
        raise ValueError(f"`input_dim` should be a positive integer. Received: input_dim={input_dim!r}")
    sizes = tuple(layer_sizes)
    if not sizes or any(isinstance(s, bool) or int(s) != s or s < 1 for s in sizes):
        raise ValueError(f"`layer_sizes` should be a non-empty sequence of positive integers. "
                         f"Received: layer_sizes={layer_sizes!r}")
    return int(input_dim), tuple(int(s) for s in sizes)


def micro_mlp_param_count(input_dim: int, layer_sizes: Sequence[int], use_bias: bool = True) -> int:
    """Σ_i (|w_i| + |b_i|) of the micro-MLP ``input_dim → layer_sizes[0] → ...`` (Eq. 6)."""
    d, sizes = _check_layer_sizes(input_dim, layer_sizes)
    total = 0
    for s in sizes:
        total += d * s + (s if use_bias else 0)
        d = s
    return total


def induction_dim(input_dim: int, layer_sizes: Sequence[int], use_bias: bool = True, orders: int = 1,
                  order_independent: bool = False, num_feeds: int = 1,
                  combination_independent: bool = False) -> int:
    """Length of an induction feature's co-action embedding ``P_induction``.

    ``micro_mlp_param_count × (orders if order_independent) × (num_feeds if
    combination_independent)``.
    """
    _check_positive(orders=orders, num_feeds=num_feeds)
    per_mlp = micro_mlp_param_count(input_dim, layer_sizes, use_bias)
    return per_mlp * (orders if order_independent else 1) * (num_feeds if combination_independent else 1)


def coaction_output_dim(layer_sizes: Sequence[int], orders: int = 1, combine_orders: str = "concat") -> int:
    """Output width of one (induction, feed) co-action: Σ layer sizes (× C when concatenated)."""
    _check_positive(orders=orders)
    _check_choice("combine_orders", combine_orders, ORDER_COMBINATIONS)
    return sum(int(s) for s in layer_sizes) * (orders if combine_orders == "concat" else 1)


@_plain_python
def split_induction(p_induction: tf.Tensor, input_dim: int, layer_sizes: Sequence[int],
                    use_bias: bool = True) -> MicroMLPParams:
    """Reshapes ``P_induction`` into the micro-MLP's per-example weights and biases.

    Args:
      p_induction: ``[..., micro_mlp_param_count(...)]`` (e.g. ``[B, K]``, or ``[B, I, K]``
        for I induction features at once).

    Returns:
      one ``(w [..., d_{i-1}, d_i], b [..., d_i] or None)`` per layer.

    Raises:
      ValueError: the last dimension is not Σ(|w_i| + |b_i|).
    """
    d, sizes = _check_layer_sizes(input_dim, layer_sizes)
    expected = micro_mlp_param_count(d, sizes, use_bias)
    p_induction = tf.convert_to_tensor(p_induction)
    width = p_induction.shape[-1]
    if width is not None and width != expected:
        raise ValueError(f"`p_induction` should have {expected} = Σ(|w_i|+|b_i|) values per example for "
                         f"input_dim={d}, layer_sizes={list(sizes)}, use_bias={use_bias}. "
                         f"Received: shape={p_induction.shape.as_list()}")
    leading = tf.shape(p_induction)[:-1]
    params: MicroMLPParams = []
    offset = 0
    for s in sizes:
        w = tf.reshape(p_induction[..., offset:offset + d * s], tf.concat([leading, [d, s]], axis=0))
        offset += d * s
        b = None
        if use_bias:
            b = p_induction[..., offset:offset + s]
            offset += s
        params.append((w, b))
        d = s
    return params


@_plain_python
def micro_mlp(h0: tf.Tensor, params: MicroMLPParams,
              activation: Union[None, str, Callable] = "tanh") -> List[tf.Tensor]:
    """Applies per-example micro-MLPs to rows of inputs; returns every layer's output.

    Args:
      h0: ``[..., N, D]``: N input rows per example (positions of a sequence, orders).
      params: from `split_induction`: ``w`` ``[..., D, d_1]`` with leading dimensions
        broadcasting against ``h0``'s (``tf.matmul`` broadcasting), ``b`` ``[..., d_1]``.
      activation: applied after every layer but the last (None: linear).

    Returns:
      ``[h_1, ..., h_L]``, each ``[..., N, d_i]`` (leading dimensions broadcast).
    """
    act = keras.activations.get(activation) if activation is not None else None
    h = tf.convert_to_tensor(h0)
    outputs = []
    for i, (w, b) in enumerate(params):
        h = tf.matmul(h, w)
        if b is not None:
            h = h + b[..., tf.newaxis, :]
        if act is not None and i < len(params) - 1:
            h = act(h)
        outputs.append(h)
    return outputs


@_plain_python
def feed_orders(p_feed: tf.Tensor, orders: int) -> List[tf.Tensor]:
    """``[P_feed^1, ..., P_feed^C]`` (element-wise powers, Eq. 8)."""
    _check_positive(orders=orders)
    out = [p_feed]
    for _ in range(orders - 1):
        out.append(out[-1] * p_feed)
    return out


@_plain_python
def co_action(p_induction: tf.Tensor, p_feed: tf.Tensor, *, input_dim: int, layer_sizes: Sequence[int],
              use_bias: bool = True, activation: Union[None, str, Callable] = "tanh", orders: int = 1,
              order_independent: bool = False, combine_orders: str = "concat",
              mask: Optional[tf.Tensor] = None, sequence_pooling: str = "coaction_then_sum") -> tf.Tensor:
    """Co-action of one feed feature with one (or I) induction feature(s).

    Args:
      p_induction: ``[B, K]``, or ``[B, I, K]`` for I induction features sharing the feed,
        with ``K = micro_mlp_param_count × (orders if order_independent)``.
      p_feed: ``[B, D]``, or a sequence ``[B, L, D]``.
      mask: for a sequence, ``[B, L]`` (1/True at real positions); None = all real.
      sequence_pooling: one of `SEQUENCE_POOLINGS` (Eq. 10 and its means).

    Returns:
      ``[B, out]`` (or ``[B, I, out]``), ``out = coaction_output_dim(layer_sizes, orders,
      combine_orders)``: per order (order 1 first) the concatenated layer outputs.
    """
    return co_action_feeds(p_induction, [p_feed], [mask], input_dim=input_dim, layer_sizes=layer_sizes,
                           use_bias=use_bias, activation=activation, orders=orders,
                           order_independent=order_independent, combine_orders=combine_orders,
                           sequence_pooling=sequence_pooling)


@_plain_python
def co_action_feeds(p_induction: tf.Tensor, feeds: Sequence[tf.Tensor],
                    masks: Optional[Sequence[Optional[tf.Tensor]]] = None, *, input_dim: int,
                    layer_sizes: Sequence[int], use_bias: bool = True,
                    activation: Union[None, str, Callable] = "tanh", orders: int = 1,
                    order_independent: bool = False, combine_orders: str = "concat",
                    sequence_pooling: str = "coaction_then_sum") -> tf.Tensor:
    """Co-actions of several feeds with the same induction slice, in one pass.

    Equals ``concat([co_action(p_induction, feed_j, mask=mask_j, ...) for j], axis=-1)``:
    for every feed and order, the micro-MLP's layer outputs, sum-pooled over the feed's
    positions. Computed with the same result but far fewer operations than one tiny
    matmul per (example, induction feature) and layer:

    * every feed's positions and orders are stacked as rows ``[B, R, D]``, and the first
      layer of all I induction features is one ``[R, D + 1] × [D + 1, I·d_1]`` matmul per
      example (the bias folded in as a column of ones);
    * the last layer is linear, so it commutes with sum pooling: it runs on the pooled
      rows (``Σ_r m_r (h_r w + b) = (Σ_r m_r h_r) w + (Σ_r m_r) b``), one row per
      (feed, order) instead of one per position. Without an activation every layer is
      linear and the pooled feeds go through the whole micro-MLP;
    * pooling is a matmul with a ``[B, F·C, R]`` matrix of the positions' weights.

    Args:
      p_induction: ``[B, K]`` or ``[B, I, K]`` (as in `co_action`).
      feeds: tensors ``[B, D]`` or ``[B, L_j, D]`` (L_j static).
      masks: one per feed (``[B, L_j]`` or None).

    Returns:
      ``[B, F × out]`` (or ``[B, I, F × out]``).
    """
    _check_choice("combine_orders", combine_orders, ORDER_COMBINATIONS)
    _check_choice("sequence_pooling", sequence_pooling, SEQUENCE_POOLINGS)
    _check_positive(orders=orders)
    d, sizes = _check_layer_sizes(input_dim, layer_sizes)
    feeds = [tf.convert_to_tensor(f) for f in feeds]
    masks = list(masks) if masks is not None else [None] * len(feeds)
    if len(masks) != len(feeds):
        raise ValueError(f"`masks` should have one entry per feed ({len(feeds)}). Received: {len(masks)}")
    p_induction = tf.convert_to_tensor(p_induction)
    several = p_induction.shape.rank == 3
    p = p_induction if several else p_induction[:, tf.newaxis]  # [B, I, K]
    per_mlp = micro_mlp_param_count(d, sizes, use_bias)
    expected = per_mlp * (orders if order_independent else 1)
    if p.shape[-1] is not None and p.shape[-1] != expected:
        raise ValueError(f"`p_induction` should have {expected} values per example (Σ(|w_i|+|b_i|) = {per_mlp} "
                         f"{'per order ' if order_independent else ''}for input_dim={d}, layer_sizes={list(sizes)}, "
                         f"use_bias={use_bias}). Received: shape={p_induction.shape.as_list()}")

    # Rows [B, R, D] and their pooling weights, one [B, R] row per feed.
    rows, weights, lengths = [], [], []
    for feed, mask in zip(feeds, masks):
        if feed.shape[-1] is not None and feed.shape[-1] != d:
            raise ValueError(f"every feed should have input_dim={d} values per position. "
                             f"Received: shape={feed.shape.as_list()}")
        if feed.shape.rank == 3:
            w = tf.ones_like(feed[..., 0]) if mask is None else tf.cast(mask, feed.dtype)
            if "mean" in sequence_pooling:
                w = w / tf.maximum(tf.reduce_sum(w, axis=1, keepdims=True), 1.0)  # an empty sequence stays 0
            if sequence_pooling.endswith("then_coaction"):
                feed = tf.reduce_sum(feed * w[..., tf.newaxis], axis=1, keepdims=True)
                w = tf.ones_like(feed[..., 0])
        else:
            feed = feed[:, tf.newaxis, :]
            w = tf.ones_like(feed[..., 0])
        if feed.shape[1] is None:
            raise ValueError("the sequence length of every feed should be static")
        rows.append(feed)
        weights.append(w)
        lengths.append(int(feed.shape[1]))
    total = sum(lengths)
    x = tf.concat(rows, axis=1)
    starts = [sum(lengths[:j]) for j in range(len(lengths))]
    pool = tf.stack([tf.pad(w, [[0, 0], [s, total - s - n]]) for w, s, n in zip(weights, starts, lengths)],
                    axis=1)  # [B, F, R]
    num_feeds = len(feeds)

    powers = feed_orders(x, orders)
    if order_independent:  # a micro-MLP per order: [B, I, F, C, width]
        out = tf.stack([_pooled_micro_mlp(h, pool, p[..., c * per_mlp:(c + 1) * per_mlp], d, sizes, use_bias,
                                          activation) for c, h in enumerate(powers)], axis=3)
    else:  # the orders as extra rows of one micro-MLP; pooled row (feed j, order c) = j·C + c
        pool_all = pool
        if orders > 1:
            pool_all = tf.reshape(
                tf.stack([tf.pad(pool, [[0, 0], [0, 0], [c * total, (orders - 1 - c) * total]])
                          for c in range(orders)], axis=2), [-1, num_feeds * orders, orders * total])
        out = _pooled_micro_mlp(tf.concat(powers, axis=1), pool_all, p, d, sizes, use_bias, activation)
        out = tf.reshape(out, tf.concat([tf.shape(out)[:2], [num_feeds, orders, sum(sizes)]], axis=0))
    if combine_orders == "sum":
        out = tf.reduce_sum(out, axis=3)
    out = tf.reshape(out, tf.concat([tf.shape(out)[:2], [-1]], axis=0))
    out.set_shape([None, None, num_feeds * coaction_output_dim(sizes, orders, combine_orders)])
    return out if several else out[:, 0]


def _pooled_micro_mlp(x: tf.Tensor, pool: tf.Tensor, p: tf.Tensor, d: int, sizes: Tuple[int, ...],
                      use_bias: bool, activation) -> tf.Tensor:
    """Pooled outputs of per-example micro-MLPs on shared rows.

    Args:
      x: ``[B, R, D]`` input rows, shared by the I micro-MLPs of an example.
      pool: ``[B, Q, R]`` pooling weights (pooled row q = Σ_r pool[q, r] · row r).
      p: ``[B, I, K]`` the micro-MLPs' parameters (the `split_induction` layout).

    Returns:
      ``[B, I, Q, Σ layer sizes]``: every layer's output, pooled.
    """
    act = keras.activations.get(activation) if activation is not None else None
    batch, num_rows, num_pooled = tf.shape(p)[0], x.shape[1], pool.shape[1]
    num_ind = p.shape[1] if p.shape[1] is not None else tf.shape(p)[1]
    row_layers = len(sizes) - 1 if act is not None else 0  # the rest is linear: computed after pooling
    fan_in_rows = d + 1 if use_bias else d

    def layer_params(offset, fan_in, size):  # [B, I, fan_in (+1 for the bias row), size]
        n = (fan_in + 1 if use_bias else fan_in) * size
        return tf.reshape(p[..., offset:offset + n], [batch, num_ind, n // size, size]), offset + n

    outputs, offset, fan_in = [], 0, d
    h = None  # row-level activations [B, R, I·fan_in]
    for i in range(row_layers):
        size = sizes[i]
        w, offset = layer_params(offset, fan_in, size)
        if i == 0:  # one matmul for all I micro-MLPs: [B, R, D+1] × [B, D+1, I·d_1]
            w = tf.reshape(tf.transpose(w, [0, 2, 1, 3]), [batch, fan_in_rows, num_ind * size])
            xin = tf.concat([x, tf.ones_like(x[..., :1])], axis=-1) if use_bias else x
            h = act(tf.matmul(xin, w))
        else:  # per micro-MLP: [B, I, R, fan_in] × [B, I, fan_in, size]
            hi = tf.transpose(tf.reshape(h, [batch, num_rows, num_ind, fan_in]), [0, 2, 1, 3])
            if use_bias:
                hi = tf.concat([hi, tf.ones_like(hi[..., :1])], axis=-1)
            hi = act(tf.matmul(hi, w))
            h = tf.reshape(tf.transpose(hi, [0, 2, 1, 3]), [batch, num_rows, num_ind * size])
        pooled = tf.matmul(pool, h)  # [B, Q, I·size]
        outputs.append(tf.transpose(tf.reshape(pooled, [batch, num_pooled, num_ind, size]), [0, 2, 1, 3]))
        fan_in = size
    if row_layers:
        z = outputs[-1]  # [B, I, Q, fan_in]
    else:
        z = tf.matmul(pool, x)[:, tf.newaxis]  # [B, 1, Q, D], broadcast over I
    count = tf.reduce_sum(pool, axis=-1)[:, tf.newaxis, :, tf.newaxis]  # [B, 1, Q, 1]: Σ_r pool[q, r]
    for i in range(row_layers, len(sizes)):
        size = sizes[i]
        w, offset = layer_params(offset, fan_in, size)
        if use_bias:
            z = tf.concat([z, tf.broadcast_to(count, tf.concat([tf.shape(z)[:-1], [1]], axis=0))], axis=-1)
        z = tf.matmul(z, w)  # [B, I, Q, size]
        outputs.append(z)
        fan_in = size
    return tf.concat(outputs, axis=-1)


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"`{name}` should be a positive integer. Received: {name}={value!r}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` should be one of {tuple(choices)}. Received: {name}={value!r}")


# ---------------------------------------------------------------------------------
# Keras adapter.
# ---------------------------------------------------------------------------------
@keras.utils.register_keras_serializable(package="recfunnel")
class CoActionUnit(keras.layers.Layer):
    """Co-action of induction features with several feed features (no weights of its own).

    Args:
      feed_dim: D, the length of every feed co-action embedding.
      layer_sizes: output sizes of the micro-MLP's layers (``D → layer_sizes[0] → ...``).
      use_bias: whether the micro-MLP has biases (part of ``P_induction``).
      activation: between layers (the last layer is linear); None for a linear MLP.
      orders: C of the multi-order enhancement.
      order_independent: a separate micro-MLP per order.
      num_feeds: how many feed features the unit is called with.
      combination_independent: a separate slice of ``P_induction`` per feed feature.
      combine_orders: ``"concat"`` (authors' code) or ``"sum"`` (paper's Eq. 8).
      sequence_pooling: one of `SEQUENCE_POOLINGS` (Eq. 10 and its means).

    Call:
      ``unit(p_induction, feeds, masks=None)`` with ``p_induction`` ``[B, induction_dim]``
      (see `induction_dim`) or ``[B, I, induction_dim]`` for I induction features at
      once, ``feeds`` a list of `num_feeds` tensors ``[B, D]`` or ``[B, L, D]``, ``masks``
      a matching list (``[B, L]`` or None). Returns ``[B, num_feeds × output_dim]`` (or
      ``[B, I, num_feeds × output_dim]``), the feeds' co-actions side by side.

    References:
      Bian et al., "CAN: Feature Co-Action for Click-Through Rate Prediction", WSDM 2022.
    """

    def __init__(self, feed_dim: int = 16, layer_sizes: Sequence[int] = (8, 4), use_bias: bool = True,
                 activation: Optional[str] = "tanh", orders: int = 1, order_independent: bool = False,
                 num_feeds: int = 1, combination_independent: bool = False, combine_orders: str = "concat",
                 sequence_pooling: str = "coaction_then_sum", **kwargs):
        super().__init__(**kwargs)
        self.feed_dim, self.layer_sizes = _check_layer_sizes(feed_dim, layer_sizes)
        _check_positive(orders=orders, num_feeds=num_feeds)
        _check_choice("combine_orders", combine_orders, ORDER_COMBINATIONS)
        _check_choice("sequence_pooling", sequence_pooling, SEQUENCE_POOLINGS)
        if activation is not None:
            try:
                keras.activations.get(activation)
            except (ValueError, TypeError):
                raise ValueError(f"`activation` should name a Keras activation or be None. "
                                 f"Received: activation={activation!r}") from None
        self.use_bias = bool(use_bias)
        self.activation = activation
        self.orders = int(orders)
        self.order_independent = bool(order_independent)
        self.num_feeds = int(num_feeds)
        self.combination_independent = bool(combination_independent)
        self.combine_orders = combine_orders
        self.sequence_pooling = sequence_pooling

    @property
    def induction_dim(self) -> int:
        return induction_dim(self.feed_dim, self.layer_sizes, self.use_bias, self.orders, self.order_independent,
                             self.num_feeds, self.combination_independent)

    @property
    def output_dim(self) -> int:
        """Width of one feed's co-action (the call returns `num_feeds` of them)."""
        return coaction_output_dim(self.layer_sizes, self.orders, self.combine_orders)

    def call(self, p_induction, feeds, masks=None):
        feeds = list(feeds)
        if len(feeds) != self.num_feeds:
            raise ValueError(f"`feeds` should hold num_feeds={self.num_feeds} tensors. Received: {len(feeds)}")
        masks = list(masks) if masks is not None else [None] * len(feeds)
        if p_induction.shape[-1] is not None and p_induction.shape[-1] != self.induction_dim:
            raise ValueError(f"`p_induction` should have induction_dim={self.induction_dim} values per example. "
                             f"Received: shape={p_induction.shape.as_list()}")
        if not self.combination_independent:
            return co_action_feeds(
                p_induction, feeds, masks, input_dim=self.feed_dim, layer_sizes=self.layer_sizes,
                use_bias=self.use_bias, activation=self.activation, orders=self.orders,
                order_independent=self.order_independent, combine_orders=self.combine_orders,
                sequence_pooling=self.sequence_pooling)
        per_feed = self.induction_dim // self.num_feeds
        outputs = []
        for j, (feed, mask) in enumerate(zip(feeds, masks)):
            start = j * per_feed
            outputs.append(co_action(
                p_induction[..., start:start + per_feed], feed, input_dim=self.feed_dim,
                layer_sizes=self.layer_sizes, use_bias=self.use_bias, activation=self.activation,
                orders=self.orders, order_independent=self.order_independent,
                combine_orders=self.combine_orders, mask=mask, sequence_pooling=self.sequence_pooling))
        return tf.concat(outputs, axis=-1)

    def get_config(self):
        return {**super().get_config(), "feed_dim": self.feed_dim, "layer_sizes": list(self.layer_sizes),
                "use_bias": self.use_bias, "activation": self.activation, "orders": self.orders,
                "order_independent": self.order_independent, "num_feeds": self.num_feeds,
                "combination_independent": self.combination_independent,
                "combine_orders": self.combine_orders, "sequence_pooling": self.sequence_pooling}
