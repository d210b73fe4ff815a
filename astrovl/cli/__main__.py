"""``python -m astrovl.cli``: the ``astrovl`` command."""

import sys

from . import main

sys.exit(main())
