"""How the item index is built (`IndexConfig`): plain settings, importable without TensorFlow
(the configuration loader checks them); `serving.index` builds and loads the indexes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict

INDEX_KINDS = ("auto", "scann", "brute_force")
# ScaNN's asymmetric hashing (lut16, as `serving.index.build_index` configures it) trains 16 clusters per block
# on the corpus itself and refuses fewer points; smaller corpora are searched exactly.
MIN_SCANN_ITEMS = 16


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How the item index is built.

    Attributes:
      kind: ``scann``, ``brute_force`` or ``auto`` (brute force up to
        `brute_force_max_items` items, ScaNN above). A corpus of fewer than `MIN_SCANN_ITEMS`
        items is always searched by brute force (exact; ScaNN cannot hash it); the resolved
        parameters then say why in ``brute_force_reason``.
      brute_force_max_items: the corpus size up to which ``auto`` stays exact.
      num_leaves: ScaNN partitions; 0 = about sqrt(N).
      leaves_to_search: partitions searched per query; 0 = tuned at build time on
        sample queries to reach `target_recall` against exact search (without sample
        queries: a third of the partitions, at least 10, at most all of them).
      target_recall: recall@10 against exact search that tuning aims for (when even a
        full search misses it: the cheapest setting within `serving.index.UNREACHABLE_TOLERANCE` of a
        full search's recall, see `serving.index.tune_search`).
      dimensions_per_block: asymmetric-hashing block size.
      anisotropic_quantization_threshold: ScaNN's η for score-aware quantization.
      reorder: candidates re-scored exactly per query (at least k); 0 = tuned together
        with `leaves_to_search` when sample queries are given and `tune_reorder`, else
        max(100, 10·k_max); capped by N.
      k_max: the largest k a query may ask for (ScaNN's default neighbours).
      training_sample_size: points used to train the partitioner; 0 = all. k-means needs at
        least one point per partition: a positive value below `num_leaves` (or, with
        ``num_leaves=0``, below the resolved partitions) is rejected with a ValueError rather
        than silently raised to it, since it names a sample the build cannot use (the hashing
        trains on its own sample of the whole corpus, so it adds no bound here).
      tune_reorder: with ``reorder=0`` and sample queries, tune the re-scoring depth
        too: for each depth in `serving.index.REORDER_CANDIDATES` the fewest partitions reaching
        `target_recall`, then the pair searching fastest on the sample queries.
    """

    kind: str = "auto"
    brute_force_max_items: int = 1000
    num_leaves: int = 0
    leaves_to_search: int = 0
    dimensions_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder: int = 0
    k_max: int = 100
    training_sample_size: int = 0
    target_recall: float = 0.97
    tune_reorder: bool = True

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"`index.kind` should be one of {INDEX_KINDS}. Received: kind={self.kind!r}")
        for name in ("brute_force_max_items", "num_leaves", "leaves_to_search", "reorder", "training_sample_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"`index.{name}` should be >= 0. Received: {name}={getattr(self, name)}")
        if self.k_max < 1:
            raise ValueError(f"`index.k_max` should be >= 1. Received: k_max={self.k_max}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"`index.target_recall` should be in (0, 1]. Received: {self.target_recall}")
        if self.dimensions_per_block < 1:
            raise ValueError(f"`index.dimensions_per_block` should be >= 1. Received: {self.dimensions_per_block}")
        if 0 < self.training_sample_size < self.num_leaves:
            raise ValueError(f"`index.training_sample_size` should be 0 (all items) or at least `index.num_leaves`="
                             f"{self.num_leaves}. Received: training_sample_size={self.training_sample_size}")

    def resolved(self, num_items: int) -> Dict[str, Any]:
        """The concrete parameters for a corpus of `num_items` (side-effect free).

        Raises:
          ValueError: an empty corpus, or a positive `training_sample_size` below the
            resolved number of partitions.
        """
        if num_items < 1:
            raise ValueError(f"cannot index an empty corpus. Received: num_items={num_items}")
        kind = self.kind
        if kind == "auto":
            kind = "brute_force" if num_items <= self.brute_force_max_items else "scann"
        out: Dict[str, Any] = {"kind": kind, "k_max": min(self.k_max, num_items)}
        if kind == "scann" and num_items < MIN_SCANN_ITEMS:
            out.update(kind="brute_force", brute_force_reason=(
                f"index.kind={self.kind!r} resolved to brute force: ScaNN's asymmetric hashing needs at least "
                f"{MIN_SCANN_ITEMS} items, the corpus has {num_items}"))
        elif kind == "scann":
            leaves = self.num_leaves or max(2, int(round(math.sqrt(num_items))))
            leaves = min(leaves, num_items)
            sample = min(num_items, self.training_sample_size or num_items)
            if sample < leaves:
                raise ValueError(f"`index.training_sample_size` should be 0 (all items) or at least the {leaves} "
                                 f"partitions (`index.num_leaves`; about sqrt({num_items}) when 0). Received: "
                                 f"training_sample_size={self.training_sample_size}")
            search = self.leaves_to_search or max(10, leaves // 3)
            out.update(
                num_leaves=leaves, leaves_to_search=min(search, leaves),
                dimensions_per_block=self.dimensions_per_block,
                anisotropic_quantization_threshold=self.anisotropic_quantization_threshold,
                reorder=min(num_items, self.reorder or max(100, 10 * out["k_max"])),
                training_sample_size=sample,
            )
        return out
