"""``python -m fastproxy`` runs the command line."""

try:
    from fastproxy.cli import main
except KeyboardInterrupt:  # Ctrl-C while the modules load: stop quietly, as main() does
    raise SystemExit(0) from None

raise SystemExit(main())
