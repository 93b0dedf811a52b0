"""``python -m surgery``: the ``surgery`` command (see :mod:`surgery.cli`)."""

from surgery.cli import main

raise SystemExit(main())
