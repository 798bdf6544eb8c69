"""`python -m pykata.agent`: start the agent (argv from sys.argv) and exit with its status.

The guest's init runs pykata.agent.pid1 instead, which sets the VM up first.
"""

import gc

from pykata.agent.boot import defer_imports

gc.disable()  # pykata.agent.main.run turns it on once start-up's objects are frozen
defer_imports()
from pykata.agent.main import main  # noqa: E402 (after the deferral, as the guest's init does)

raise SystemExit(main())
