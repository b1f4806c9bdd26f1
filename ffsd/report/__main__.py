"""``python -m ffsd.report``: see :mod:`ffsd.report.summary`."""

import sys

from ffsd.report.summary import main

sys.exit(main())
