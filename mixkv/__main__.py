"""``python -m mixkv ...`` is the ``mixkv`` command."""

import sys

from mixkv.commands import main

sys.exit(main())
