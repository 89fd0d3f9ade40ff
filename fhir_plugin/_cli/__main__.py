"""``python -m fhir_plugin._cli``: the same command line as the ``fhir-plugin`` script (the serve test runs it so)."""

import sys

from . import main

sys.exit(main())
