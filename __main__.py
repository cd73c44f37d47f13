"""``python -m cadenza`` runs the command-line interface."""

from cadenza.cli import main

raise SystemExit(main())
