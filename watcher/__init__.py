"""watcher: a hot-folder daemon that analyses new audio files and archives their processed versions.

Words used everywhere: a *folder* is watched; each *revision* gets one *job* per *pipeline* (analyze,
archive); a job stands at a *step* and is in a *state*; a paid call is an *operation* through the gate; a
*backend* is where analysis runs; an error has a *scope*. ARCHITECTURE.md draws who talks to whom.
"""

__version__ = "0.2.0"
