"""``python -m fastproxy`` runs the command line."""

from fastproxy.cli import main

raise SystemExit(main())
