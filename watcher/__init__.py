"""watcher: a hot-folder daemon that analyses new audio files and archives their processed versions."""

__version__ = "0.1.0"
