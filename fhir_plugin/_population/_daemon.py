"""Spark's Python daemon, with the check loaded before it forks the workers that run it.

PySpark starts one daemon per executor and forks a Python worker from it for each task
slot.  A worker forked from the plain daemon imports the FHIR R4 models, builds their
validators on first use and loads the profile and the ICD-10-CM data itself — tens of
seconds per worker on a busy machine, paid again by every new worker.  Forked from this
daemon, every worker starts with all of that done (copy-on-write).  Set by
``spark_session`` as ``spark.python.daemon.module``.
"""

from __future__ import annotations


def _warm() -> None:
    """Import the review pipeline, load the default profile and build the R4 validators it uses."""
    from fhir.resources.R4B import get_fhir_model_class

    from .. import _review  # noqa: F401  (the pipeline and everything it imports)
    from .._profile import DEFAULT_PROFILE, load_profile
    from .._vocab import DRAFT_TYPES, READ_TYPES

    load_profile(DEFAULT_PROFILE)
    for rtype in (*READ_TYPES, *DRAFT_TYPES, "Bundle"):
        try:
            get_fhir_model_class(rtype).model_validate({"resourceType": rtype})
        except Exception:  # an empty resource may be invalid; its validators are built all the same
            pass


if __name__ == "__main__":
    try:
        _warm()
    except Exception:  # never stop Spark's daemon: the workers then load what they need themselves
        pass
    from pyspark.daemon import manager

    manager()
