from __future__ import annotations

import sys

from nexcompute_agent.cli import main

sys.exit(main())
