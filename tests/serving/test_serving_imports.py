"""The serving path imports no Beam, no TFRS, no training code: the slim serving image
(`docker/Dockerfile.serve`, `docker/requirements-serve.txt`) depends on it."""

import json
import os
import re

from conftest import REPO, python_subprocess

FORBIDDEN = ("apache_beam", "tensorflow_recommenders", "tensorflow_datasets", "dask", "distributed",
             "matplotlib", "pipeline.data", "pipeline.job", "beam_jobs", "models.two_tower", "models.ranking")


def test_serving_a_request_imports_only_the_serving_stack(ranked_workdir):
    code = f"""
import json, sys
from pipeline import cli  # the `recfunnel serve` entry point
from fastapi.testclient import TestClient
from serving.service import ServiceConfig, create_app
import pyarrow.parquet as pq
user = pq.read_table({os.path.join(ranked_workdir, 'data', 'users.parquet')!r}).column("user_id")[0].as_py()
with TestClient(create_app(ServiceConfig({ranked_workdir!r}, poll_interval=0))) as c:
    r = c.post("/v1/recommend", json={{"user_id": user, "k": 3}})
    assert r.status_code == 200, r.text
    stages = r.json()["stages"]
print(json.dumps({{"stages": stages, "modules": sorted(sys.modules)}}))
"""
    proc = python_subprocess(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stages"] == ["retrieval", "preranker", "ranker"]
    loaded = [m for m in out["modules"] if m.startswith(FORBIDDEN)]
    assert loaded == []
    # the serving image installs every package of the serving path (scann: only for ScaNN indexes)
    with open(os.path.join(REPO, "docker", "requirements-serve.txt")) as f:
        names = {re.split(r"[\[~=<>]", line.strip())[0] for line in f if line.strip() and not line.startswith("#")}
    import_names = {"tf-keras": "tf_keras", "pyyaml": "yaml"}
    used = {"tensorflow", "tf_keras", "numpy", "pandas", "pyarrow", "fastapi"}
    assert used <= set(out["modules"])
    # plus scann (ScaNN indexes), uvicorn (`serve`) and yaml (configs)
    assert used | {"scann", "uvicorn", "yaml"} == {import_names.get(n, n) for n in names}
