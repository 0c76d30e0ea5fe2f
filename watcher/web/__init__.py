"""The local web page and JSON API, served inside the daemon (``[web]`` in the config)."""
