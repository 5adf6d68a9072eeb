"""Names in the scoring models' export contract, shared by the code that writes the
exports (`models.ranking`, `models.preranking`) and the code that calls them
(`serving.cascade`), which imports no training code.

A ranker or pre-ranker SavedModel has two signatures over the schema's features:

    serving_default   one user (user features with batch 1) × N candidates → scores [N]
    score_users       U users (user features with U rows) × N candidates, plus
                      ``user_index`` [N] int32: candidate i belongs to user row user_index[i]
"""

SERVING_DEFAULT = "serving_default"
MULTI_USER_SIGNATURE = "score_users"
USER_INDEX = "user_index"

__all__ = ["SERVING_DEFAULT", "MULTI_USER_SIGNATURE", "USER_INDEX"]
