"""The ranking stage: CAN and its baselines, click losses, metrics and sequences."""

from models.ranking.co_action import (CoActionUnit, co_action, co_action_feeds, coaction_output_dim, feed_orders, induction_dim,
                                      micro_mlp, micro_mlp_param_count, split_induction)
from models.ranking.losses import (BinaryCrossEntropy, FocalLoss, GHMCLoss, binary_cross_entropy, focal_loss,
                                   ghm_bin_index, ghm_c_loss, ghm_c_weights, ghm_gradient_norm, make_loss)
from models.ranking.metrics import auc, calibration, ctr_metrics, gauc, log_loss
from models.ranking.models import (CAN, DIN, DNN, MODEL_TYPES, CartesianDNN, RankingConfig, RankingModel,
                                   TargetAttentionPooling, build_ranker, build_vocabularies, cartesian_ids,
                                   coaction_features, export_ranker, inputs_from_frame)
from models.ranking.sequences import build_sequences

__all__ = [
    "CoActionUnit", "co_action", "co_action_feeds", "coaction_output_dim", "feed_orders", "induction_dim", "micro_mlp",
    "micro_mlp_param_count", "split_induction",
    "BinaryCrossEntropy", "FocalLoss", "GHMCLoss", "binary_cross_entropy", "focal_loss", "ghm_bin_index",
    "ghm_c_loss", "ghm_c_weights", "ghm_gradient_norm", "make_loss",
    "auc", "calibration", "ctr_metrics", "gauc", "log_loss",
    "CAN", "DIN", "DNN", "MODEL_TYPES", "CartesianDNN", "RankingConfig", "RankingModel", "TargetAttentionPooling",
    "build_ranker", "build_vocabularies", "cartesian_ids", "coaction_features", "export_ranker", "inputs_from_frame",
    "build_sequences",
]
