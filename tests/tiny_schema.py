"""The tiny schema and vocabularies shared by the model tests (rankers, pre-rankers, round trips).

`pytest.ini` puts `tests/` on the path: ``from tiny_schema import SCHEMA, VOCABS``.
"""

from models.features import HISTORY, ITEM_ID, USER_ID, Feature, Kind, Schema

SCHEMA = Schema(
    user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"), Feature("age", Kind.CATEGORICAL, "user"),
                   Feature(HISTORY, Kind.SEQUENCE, "user", max_length=3)),
    item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"), Feature("category", Kind.CATEGORICAL, "item"),
                   Feature("tags", Kind.MULTI_CATEGORICAL, "item", max_length=2),
                   Feature("price", Kind.NUMERIC, "item")),
    has_label=True, name="tiny")
VOCABS = {USER_ID: ["u1", "u2"], "age": ["a", "b"], ITEM_ID: ["i1", "i2", "i3"], "category": ["c1", "c2"],
          "tags": ["t1", "t2"]}
