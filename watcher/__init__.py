"""watcher: a hot-folder daemon that analyses new audio files and archives their processed versions.

Words used everywhere: a *folder* is watched; each *revision* gets one *job* per *pipeline* (analyze,
archive); a job stands at a *step* and is in a *state*; a paid call is an *operation* through the gate; a
*backend* is where analysis runs; an error has a *scope*. ARCHITECTURE.md draws who talks to whom.
"""

import signal as _signal
import sys as _sys

__version__ = "0.2.0"

# `watcher run`: a reload (SIGHUP) sent in the daemon's first half second, while Python still imports it, would end
# it (exit 129). Ignored from here, the first line of watcher that runs, until the daemon's own handler is in; the
# config it then reads is the newest anyway. (A library import is not a command line: nothing changes for it.)
if "run" in _sys.argv[1:] and (_sys.argv[0] == "-m" or _sys.argv[0].endswith("watcher")):
    _signal.signal(_signal.SIGHUP, _signal.SIG_IGN)
