"""Names in the scoring models' export contract, shared by the code that writes the
exports (`models.ranking`, `models.preranking`) and the code that calls them
(`serving.cascade`), which imports no training code.

A ranker or pre-ranker SavedModel has these signatures over the schema's features:

    serving_default      one user (user features with batch 1) × N candidates → scores [N]
    score_users          U users (user features with U rows) × N candidates, plus
                         ``user_index`` [N] int32: candidate i belongs to user row user_index[i]
    encode_items         N items' features → their encoded form, by feature name: the
                         model's own vocabulary ids (int32 [N] / [N, L]) for categorical
                         and multi-valued features, the standardized value (float32 [N])
                         for numeric ones
    score_users_encoded  as score_users, with the item features in that encoded form

A server encodes its whole item table once per loaded model (`encode_items`) and then
scores candidates by gathering rows of integers (`score_users_encoded`): no string is
gathered or looked up per candidate. Exports older than these two signatures have only
the first two.
"""

from typing import Any, Dict, Mapping

SERVING_DEFAULT = "serving_default"
MULTI_USER_SIGNATURE = "score_users"
USER_INDEX = "user_index"
ENCODE_ITEMS_SIGNATURE = "encode_items"
ENCODED_SCORING_SIGNATURE = "score_users_encoded"

__all__ = ["SERVING_DEFAULT", "MULTI_USER_SIGNATURE", "USER_INDEX", "ENCODE_ITEMS_SIGNATURE",
           "ENCODED_SCORING_SIGNATURE", "several_user_arguments"]


def several_user_arguments(user_features: Mapping[str, Any], item_features: Mapping[str, Any],
                           user_index: Any) -> Dict[str, Any]:
    """The keyword arguments of `score_users` and `score_users_encoded`: U users' features
    (U rows), N candidates' item features (as `serving_default` takes them, or as
    `encode_items` returns them) and ``user_index`` ([N] int32, the user row of each
    candidate). Values pass through unchanged: the caller makes them tensors."""
    for name in (*user_features, *item_features):
        if name == USER_INDEX:
            raise ValueError(f"A feature may not be named {USER_INDEX!r}: the several-user signatures take "
                             f"it as the candidates' user rows")
    both = sorted(set(user_features) & set(item_features))
    if both:
        raise ValueError(f"Features {both} are given both as user and as item features")
    return {**user_features, **item_features, USER_INDEX: user_index}
