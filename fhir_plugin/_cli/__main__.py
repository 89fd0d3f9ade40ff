"""``python -m fhir_plugin._cli``: the same as the ``fhir-plugin`` command."""

import sys

from . import main

sys.exit(main())
