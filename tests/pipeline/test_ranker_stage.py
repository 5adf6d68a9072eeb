"""The ranking stage's data: labelled events with leak-free histories."""

import dataclasses
import os

import numpy as np
import pytest

from models import data_layout as layout
from models.features import HISTORY, ITEM_ID, LABEL, PAD_TOKEN, TIMESTAMP, USER_ID, Schema
from models.ranking.training import last_events_mask
from pipeline.ranker_stage import NoLabelsError, ranking_frame


@pytest.fixture(scope="module")
def frame(tiny_data_dir):
    return ranking_frame(tiny_data_dir, Schema.load(os.path.join(tiny_data_dir, layout.SCHEMA_FILE)))


def test_every_event_is_a_labelled_row_with_its_user_and_item_features(frame, tiny_data_dir):
    import pandas as pd

    n = sum(len(pd.read_parquet(p)) for s in layout.SPLITS for p in layout.interaction_files(tiny_data_dir, s))
    assert len(frame) == n and set(frame["split"]) == {"train", "test"}
    assert set(np.unique(frame[LABEL])) <= {0.0, 1.0}
    for column in ("age", "category", "tags"):
        assert not frame[column].isna().any()


def test_histories_hold_only_earlier_training_clicks_of_the_same_user(frame):
    # brute force: the earlier clicked training items of the user, most recent L kept, oldest first
    length = len(frame[HISTORY].iloc[0])
    sources = frame[(frame["split"] == "train") & (frame[LABEL] > 0)]
    by_user = {u: g.sort_values([TIMESTAMP, ITEM_ID]) for u, g in sources.groupby(USER_ID)}
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(frame["split"] == s), size=100, replace=False)
                           for s in ("train", "test")])
    longer = 0
    for i in rows:
        row = frame.iloc[i]
        events = by_user.get(row[USER_ID], sources.iloc[:0])
        earlier = events[events[TIMESTAMP] < row[TIMESTAMP]][ITEM_ID].astype(str).tolist()[-length:]
        assert [v for v in row[HISTORY] if v != PAD_TOKEN] == earlier
        longer += len(earlier) > 0
    assert longer > 100  # most rows have a history to compare


def test_a_test_event_is_ranked_with_the_history_it_is_served_with(frame, tiny_data_dir):
    """Train/serve parity: the history of a user's test events (after all of the user's
    training events here: leave-last-n) is the one the serving user store holds, and the
    one the retrieval examples of those events carry."""
    import tensorflow as tf

    from models.examples import parse_examples
    from serving.user_store import UserStore

    store = UserStore(tiny_data_dir)
    test = frame[frame["split"] == "test"]
    for _, row in test.iterrows():
        assert [v for v in row[HISTORY] if v != PAD_TOKEN] == store.row(row[USER_ID])[HISTORY]
    schema = Schema.load(os.path.join(tiny_data_dir, layout.SCHEMA_FILE))
    by_event = {(str(r[USER_ID]), str(r[ITEM_ID]), int(r[TIMESTAMP])): [v for v in r[HISTORY] if v != PAD_TOKEN]
                for _, r in frame.iterrows()}
    checked = 0
    for split in layout.SPLITS:
        for path in layout.example_files(tiny_data_dir, split):
            for batch in tf.data.TFRecordDataset(path, compression_type="GZIP").batch(200).take(1):
                parsed = parse_examples(schema, batch)
                for user, item, ts, history in zip(parsed[USER_ID].numpy(), parsed[ITEM_ID].numpy(),
                                                   parsed[TIMESTAMP].numpy(), parsed[HISTORY].numpy()):
                    key = (user.decode(), item.decode(), int(ts))
                    assert by_event[key] == [v.decode() for v in history if v], key
                    checked += 1
    assert checked >= 200


def test_data_without_labels_are_refused(tiny_data_dir):
    schema = Schema.load(os.path.join(tiny_data_dir, layout.SCHEMA_FILE))
    with pytest.raises(NoLabelsError, match="has no `label` column"):
        ranking_frame(tiny_data_dir, dataclasses.replace(schema, has_label=False))


def test_last_events_mask():
    users = np.array(["a", "a", "a", "a", "b", "b", "c"])
    times = np.array([4, 1, 3, 2, 5, 5, 9])
    # a: the last ceil(0.5 * 4) = 2 by time are t=3, t=4; b: ceil(1) = 1, tie broken by position; c: at least 1
    assert last_events_mask(users, times, 0.5).tolist() == [True, False, True, False, False, True, True]
    with pytest.raises(ValueError, match="fraction=1.0"):
        last_events_mask(users, times, 1.0)


def test_the_history_rule_is_part_of_the_stage_fingerprint(monkeypatch):
    """A workdir whose ranker was trained under another history rule retrains (and so does
    the pre-ranker, whose fingerprint holds the ranker's)."""
    from pipeline import ranker_stage
    from pipeline.config import RunConfig
    from pipeline.job import ranker_fingerprint

    config = RunConfig()
    now = ranker_fingerprint(config, "data-1")
    assert ranker_fingerprint(config, "data-1") == now and ranker_fingerprint(config, "data-2") != now
    monkeypatch.setattr(ranker_stage, "HISTORY_RULE", "every earlier event")
    assert ranker_fingerprint(config, "data-1") != now
