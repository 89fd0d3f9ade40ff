"""The file to hand ``spark-submit``, which runs Python programs by their ``.py`` file, not a console script.

    spark-submit --master spark://HOST:7077 "$(python -c 'import fhir_plugin._cli.submit as s; print(s.__file__)')" \
        population --ndjson DIR --out OUT

runs ``fhir-plugin population`` with spark-submit's master and settings (see ``_population._job.spark_session``).
"""

import sys

from fhir_plugin._cli import main

if __name__ == "__main__":
    sys.exit(main())
