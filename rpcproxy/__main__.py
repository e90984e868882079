"""``python -m rpcproxy``: the same as the ``rpcproxy`` command."""

import sys

from rpcproxy.cli import main

sys.exit(main())
