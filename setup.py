"""recfunnel: a retrieval -> pre-ranking -> ranking pipeline for recommender systems."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# The stack is pinned together: ScaNN's TensorFlow ops are built for TF 2.20 only,
# and TensorFlow Recommenders needs the Keras 2 API (tf-keras) of the same release.
INSTALL_REQUIRES = [
    "tensorflow~=2.20.0",
    "tf-keras~=2.20.0",
    "tensorflow-recommenders==0.7.7",
    "scann[tf]==1.4.2",
    "apache-beam>=2.60",
    "tensorflow-datasets>=4.9",
    "importlib_resources",  # tensorflow-datasets needs it to prepare a dataset locally
    "numpy>=1.26",
    "pandas>=2.0",
    "pyarrow>=14",
    "pyyaml>=6.0",
    "matplotlib>=3.7",
    # the HTTP service (`recfunnel serve`)
    "fastapi>=0.110",
    "uvicorn[standard]>=0.29",  # with httptools and uvloop, uvicorn's C-accelerated HTTP parser and event loop
]

EXTRAS_REQUIRE = {
    # apache-beam[dask]: CI runs the statistics job on a Dask cluster (tests/beam_jobs/test_dask_runner.py)
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "httpx>=0.27", "hypothesis>=6.100", "schemathesis>=4.0,<5",
            "apache-beam[dask]"],
    # Beam's DaskRunner (dask + distributed): the statistics job on a Dask cluster
    "dask": ["apache-beam[dask]"],
    # benchmarks/index.py compares ScaNN with these
    "bench": ["faiss-cpu>=1.8", "hnswlib>=0.8", "matplotlib>=3.7"],
}

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    LONG_DESCRIPTION = f.read()

setup(
    name="recfunnel",
    version="0.1.0",
    description="Retrieval and ranking pipeline for recommender systems on TensorFlow",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["pipeline", "pipeline.*", "models", "models.*",
                                    "beam_jobs", "beam_jobs.*", "serving", "serving.*"]),
    package_data={"pipeline": ["configs/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["recfunnel=pipeline.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "License :: OSI Approved :: Apache Software License",
    ],
)
