"""The export contract's argument assembly for the several-user signatures."""

import pytest

from models.signatures import USER_INDEX, several_user_arguments


def test_several_user_arguments_joins_users_items_and_index():
    users = {"age": ["30", "40"]}
    items = {"item_id": [3, 1, 2], "category": [0, 0, 1]}
    args = several_user_arguments(users, items, [0, 1, 1])
    assert args == {"age": ["30", "40"], "item_id": [3, 1, 2], "category": [0, 0, 1], USER_INDEX: [0, 1, 1]}
    assert users == {"age": ["30", "40"]} and USER_INDEX not in items  # the inputs are left alone


def test_several_user_arguments_names_a_feature_given_twice():
    with pytest.raises(ValueError, match=r"\['item_id'\] are given both"):
        several_user_arguments({"item_id": [1]}, {"item_id": [2]}, [0])


def test_several_user_arguments_rejects_a_feature_named_user_index():
    with pytest.raises(ValueError, match=f"may not be named '{USER_INDEX}'"):
        several_user_arguments({USER_INDEX: [1]}, {"item_id": [2]}, [0])


def test_the_scoring_function_of_a_model_rejects_a_feature_named_user_index():
    from models.ranking.models import multi_user_scoring_function
    from models.tf_compat import tf

    spec = tf.TensorSpec([None], tf.string)
    with pytest.raises(ValueError, match=f"may not be named '{USER_INDEX}'"):
        multi_user_scoring_function(None, {USER_INDEX: spec}, {"item_id": spec})
