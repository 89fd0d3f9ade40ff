"""Spark's Python daemon, with the check loaded before it forks the workers that run it.

PySpark starts one daemon per executor and forks a Python worker from it for each task
slot.  A worker forked from the plain daemon imports the FHIR R4 models, builds their
validators on first use and loads the profile and the ICD-10-CM data itself — tens of
seconds per worker on a busy machine, paid again by every new worker.  Forked from this
daemon, every worker starts with all of that done (copy-on-write).  Set by
``spark_session`` as ``spark.python.daemon.module``.
"""

from __future__ import annotations

#: set (to "1") by ``spark_session`` when the job validates whole resources or builds drafts
WARM_R4 = "FHIR_PLUGIN_WARM_R4"


def _warm() -> None:
    """Import the review pipeline and load the default profile; build the R4 validators only if they are used.

    Without ``--write`` or ``--strict-r4`` the job never touches the R4 models
    (``_shape`` checks what the check reads), so the daemon does not pay for them.
    """
    import os

    from .. import _review  # noqa: F401  (the pipeline and everything it imports)
    from .._profile import DEFAULT_PROFILE, load_profile
    from .._vocab import DRAFT_TYPES, READ_TYPES

    load_profile(DEFAULT_PROFILE)
    if os.environ.get(WARM_R4) != "1":
        return
    from fhir.resources.R4B import get_fhir_model_class

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
