"""What the synthetic generator's own hidden parameters score under the retrieval evaluation.

    python benchmarks/synthetic_ceiling.py --out ceiling.json
    python benchmarks/synthetic_ceiling.py --set data.synthetic.mean_impressions_per_user=6 --out c.json

Materializes the dataset of the config (the built-in synthetic default, `--set`
overrides as for `recfunnel run`) and ranks the full corpus for every test user with
scores built from the planted truth (`pipeline.data.synthetic.synthetic_world`), judged
exactly as `recfunnel run` judges the two-tower model (training items removed,
Recall@K and NDCG@K overall and on the tail, `evaluation.head_fraction`):

  click law       log popularity + β·p_u·q_i + log sigmoid(click logit without the
                  history term): how the generator draws impressions, times their click
                  probability (the test positives are clicks)
  impression law  log popularity + β·p_u·q_i (no click model)
  popularity      the training counts, as `baseline.popularity.*` ranks

A trained model's distance to the click law is what more data or a better model could
still gain; the planted law is not a hard ceiling (it omits the history term and every
user sees a sample of it), but no model learns more than the generator planted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from pipeline import job
    from pipeline.config import load_config
    from pipeline.data.synthetic import synthetic_world
    from pipeline.evaluation import (items_by_popularity, popularity_ranking, ranked_ids, recall_ndcg_at_k,
                                     tail_only, test_positives, top_k_excluding)
    from serving.user_store import UserStore

    cfg = load_config(None, args.set)
    if cfg.data.source != "synthetic":
        p.error(f"the planted truth exists only for synthetic data; data.source={cfg.data.source!r}")
    base = tempfile.mkdtemp(prefix="recfunnel-ceiling-")
    try:
        job.stage_data(cfg, base)
        job.stage_stats(cfg, base)
        data_dir = os.path.join(base, job.DATA_DIR)
        truth = test_positives(data_dir)
        store = UserStore(data_dir)
        ids, counts, _ = job.read_item_frequencies(os.path.join(base, job.STATS_DIR))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    synthetic = cfg.data.synthetic
    world = synthetic_world(synthetic)
    num_items = len(world.item_log_popularity)
    item_ids = [f"i{i}" for i in range(num_items)]
    position = {item: i for i, item in enumerate(item_ids)}
    popular = items_by_popularity(ids, counts)
    users = sorted(u for u in truth if u in store)
    seen = [store.seen(u) for u in users]
    relevant = [truth[u] for u in users]
    tail_relevant = tail_only(relevant, popular, cfg.evaluation.head_fraction, num_items)
    kmax = max(cfg.evaluation.ks)
    ranked = {"click law": [], "impression law": [], "popularity": popularity_ranking(popular, seen, kmax)}
    for start in range(0, len(users), 1024):
        u = np.array([int(x[1:]) for x in users[start:start + 1024]])
        exclude = [[position[i] for i in s if i in position] for s in seen[start:start + 1024]]
        affinity = world.user_vectors[u] @ world.item_vectors.T
        click_logit = (world.click_bias + 0.5 * affinity
                       + world.w_age_category[world.user_age[u]][:, world.item_category]
                       + world.w_gender_price[world.user_gender[u]][:, world.item_price]
                       + world.w_region_subcategory[world.user_region[u]][:, world.item_subcategory])
        impression = world.item_log_popularity[None] + synthetic.affinity_strength * affinity
        for name, scores in (("click law", impression - np.logaddexp(0.0, -click_logit)),
                             ("impression law", impression)):
            top, _ = top_k_excluding(scores, kmax, exclude)
            ranked[name].extend(ranked_ids(top, item_ids))

    results = {}
    for name in ranked:
        row = {}
        for k in cfg.evaluation.ks:
            overall = recall_ndcg_at_k(ranked[name], relevant, k)
            tail = recall_ndcg_at_k(ranked[name], tail_relevant, k)
            row.update({f"recall@{k}": round(overall["recall"], 4), f"ndcg@{k}": round(overall["ndcg"], 4),
                        f"tail.recall@{k}": round(tail["recall"], 4), f"tail.ndcg@{k}": round(tail["ndcg"], 4)})
        results[name] = row
    out = {"overrides": args.set, "users": len(users), "items": num_items,
           "tail_users": sum(1 for t in tail_relevant if t), "results": results}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
