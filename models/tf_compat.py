"""The one place where TensorFlow is imported with the Keras 2 API.

TensorFlow Recommenders is written against Keras 2 (`tf_keras`). TensorFlow 2.16+
defaults to Keras 3 unless `TF_USE_LEGACY_KERAS=1` is set *before* TensorFlow is
first imported. Every module of the project that needs TensorFlow imports it from
here::

    from models.tf_compat import tf, keras

so the switch happens exactly once, early, and a Keras 3 session is reported
clearly instead of failing later with an obscure layer error.
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ start-up chatter (CUDA probing on CPU-only machines) hides the
# messages users need; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if os.environ["TF_USE_LEGACY_KERAS"] not in ("1", "true", "True"):
    raise ImportError(
        "recfunnel needs the Keras 2 API (tf_keras) for TensorFlow Recommenders. "
        f"Received: TF_USE_LEGACY_KERAS={os.environ['TF_USE_LEGACY_KERAS']!r}; "
        "unset it or set it to 1."
    )

_tf_was_imported = "tensorflow" in sys.modules

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

if not tf.keras.__name__.startswith("tf_keras"):
    raise ImportError(
        "TensorFlow was imported with Keras 3 before recfunnel could select Keras 2 "
        f"(tf.keras is {tf.keras.__name__!r}). Set TF_USE_LEGACY_KERAS=1 in the "
        "environment, or import recfunnel modules before importing tensorflow."
        + (" TensorFlow was already imported when models.tf_compat loaded."
           if _tf_was_imported else "")
    )

__all__ = ["tf", "keras"]
