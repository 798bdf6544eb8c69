"""`python -m pykata.agent`: the guest init runs the agent this way."""

from pykata.agent.main import main

raise SystemExit(main())
