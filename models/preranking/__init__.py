"""The pre-ranking stage: AutoFAS feature and architecture search under measured latency."""

from models.preranking.autofas import (AutoFASSearch, DerivedArchitecture, FeatureMask, MixOp, derive_architecture,
                                       derive_from_model, straight_through_bernoulli)
from models.preranking.embedding import FeatureEmbedding
from models.preranking.latency import (IDENTITY, LatencyTable, architecture_latency, expected_architecture_latency,
                                       expected_feature_latency, expected_input_width)
from models.preranking.losses import DistillationLoss, distillation_loss
from models.preranking.measurement import measure_latency_table
from models.preranking.preranker import PreRanker, export_preranker
from models.preranking.training import (AutoFASSearchTrainer, PrerankerConfig, derived_latency, fit_distilled,
                                        teacher_logits, train_preranker)

__all__ = [
    "AutoFASSearch", "DerivedArchitecture", "FeatureMask", "MixOp", "derive_architecture", "derive_from_model",
    "straight_through_bernoulli", "FeatureEmbedding", "IDENTITY", "LatencyTable", "architecture_latency",
    "expected_architecture_latency", "expected_feature_latency", "expected_input_width", "DistillationLoss",
    "distillation_loss", "measure_latency_table", "PreRanker", "export_preranker", "AutoFASSearchTrainer",
    "PrerankerConfig", "derived_latency", "fit_distilled", "teacher_logits", "train_preranker",
]
