"""Quality gates deciding whether a new export version becomes the served one.

A version is promoted when its gate metric reaches `min_value` and is not worse than
the currently promoted version's by more than `max_regression` (absolute), the two
measured on the same data (`promote_if_better` measures the promoted version again when
the data changed since its promotion). Only then
does ``export/promoted.json`` change; a version turned down is recorded in
``export/rejected.json``, so that a bad model never reaches serving, not even on a
workdir where nothing was promoted yet. The newest `keep_versions` versions are kept
(the promoted one always).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from typing import Any, Callable, Dict, Optional

# Metrics of the ranking stages that can gate a promotion (higher is better), besides the
# cut-off metrics ``<prefix>.<name>@K`` of the retrieval evaluation.
GATE_STAGE_METRICS = ("ranker.auc", "ranker.gauc", "preranker.auc", "preranker.gauc")

log = logging.getLogger("recfunnel")


@dataclasses.dataclass(frozen=True)
class PromotionConfig:
    """Quality gates and retention of exports.

    Attributes:
      metric: the metrics.json key compared, e.g. ``retrieval.recall@10``.
      min_value: the metric must reach at least this.
      max_regression: allowed drop against the promoted version (absolute).
      keep_versions: how many newest versions to keep on disk (>= 1).
    """

    metric: str = "retrieval.recall@10"
    min_value: float = 0.0
    max_regression: float = 0.01
    keep_versions: int = 5

    def __post_init__(self):
        if self.keep_versions < 1:
            raise ValueError(f"`promotion.keep_versions` should be >= 1. Received: {self.keep_versions}")
        if self.max_regression < 0:
            raise ValueError(f"`promotion.max_regression` should be >= 0. Received: {self.max_regression}")


def gate(candidate: Dict[str, Any], current: Optional[Dict[str, Any]], config: PromotionConfig) -> Dict[str, Any]:
    """Pure decision: ``{"promote": bool, "reason": str, ...}``."""
    if config.metric not in candidate:
        raise ValueError(f"`promotion.metric` {config.metric!r} is not among the run's metrics: "
                         f"{sorted(k for k in candidate if '@' in k)}")
    value = float(candidate[config.metric])
    out = {"metric": config.metric, "value": value, "min_value": config.min_value}
    if not value >= config.min_value:
        return {**out, "promote": False, "reason": f"{config.metric}={value:.4f} < min_value={config.min_value}"}
    if current is not None and config.metric in current:
        previous = float(current[config.metric])
        out["promoted_value"] = previous
        if value < previous - config.max_regression:
            return {**out, "promote": False,
                    "reason": f"{config.metric}={value:.4f} is worse than the promoted {previous:.4f} "
                              f"by more than max_regression={config.max_regression}"}
    return {**out, "promote": True, "reason": "passed"}


def promote_if_better(workdir: str, version: int, metrics: Dict[str, Any], config: PromotionConfig,
                      data_fingerprint: Optional[str] = None,
                      reevaluate: Optional[Callable[[int], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Applies the gate to `version`, records the promotion, prunes old versions.

    Args:
      data_fingerprint: what the run's metrics were measured on; recorded with a promotion.
      reevaluate: version → its metrics on this run's data. When the promoted version was
        measured on other data (another fingerprint), it is measured again on this run's
        test split before the comparison, so that both sides of `max_regression` see the
        same data (a data refresh changes every metric). Without it, or when the promoted
        version's exports are gone, its recorded metrics are used.
    """
    from serving import exports

    record = exports.promoted(workdir)
    if record is not None and int(record["version"]) == int(version):
        return {"promote": True, "version": int(version), "reason": "already promoted"}
    current = record["metrics"] if record else None
    remeasured = False
    if (record is not None and reevaluate is not None and data_fingerprint is not None
            and record.get("data_fingerprint") != data_fingerprint
            and int(record["version"]) in exports.complete_versions(workdir)):
        fresh = reevaluate(int(record["version"]))
        if config.metric in fresh:
            current, remeasured = fresh, True
            log.info("promoted version %d measured again on this run's data: %s=%.4f (recorded %s)",
                     int(record["version"]), config.metric, float(fresh[config.metric]),
                     record["metrics"].get(config.metric))
        else:
            log.warning("the data changed since version %d was promoted, and %s cannot be measured again on "
                        "this run's data: max_regression compares it with the figure recorded on its own data",
                        int(record["version"]), config.metric)
    decision = gate(metrics, current, config)
    decision["version"] = int(version)
    if record is not None:
        decision["promoted_version"] = int(record["version"])
        decision["promoted_measured_on"] = "this run's data" if remeasured else "its own run's data"
    rejected = exports.rejected_versions(workdir)
    if decision["promote"]:
        gated = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and ("@" in k or k in GATE_STAGE_METRICS or k == config.metric)}
        exports.write_promoted(workdir, version, gated, data_fingerprint)
        rejected.pop(int(version), None)
        log.info("promoted export version %d (%s)", version, decision["reason"])
    else:
        rejected[int(version)] = decision["reason"]
        log.warning("export version %d NOT promoted: %s", version, decision["reason"])
    keep = set()
    for model in exports.MODELS:
        vs = exports.versions(workdir, model)
        keep |= set(vs[-config.keep_versions:])
    current = exports.promoted_version(workdir)
    # The pre-ranker and ranker the promoted version serves with, when it has none of its own.
    serves_with = {model: exports.stage_version(workdir, model, current) for model in exports.OPTIONAL_MODELS
                   if current is not None}
    for model in exports.ARTIFACTS:
        for v in exports.versions(workdir, model):
            if v not in keep and v != current and v != serves_with.get(model):
                shutil.rmtree(exports.version_path(workdir, model, v), ignore_errors=True)
    on_disk = {v for model in exports.ARTIFACTS for v in exports.versions(workdir, model)}
    exports.write_rejected(workdir, {v: r for v, r in rejected.items() if v in on_disk})
    return decision
