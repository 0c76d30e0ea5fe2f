"""`python -m watcher`: the same entry point as the `watcher` console script."""

from watcher.cli import main

raise SystemExit(main())
