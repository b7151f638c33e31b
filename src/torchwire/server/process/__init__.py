"""The server process: ``Server`` (start, serve, stop, in order), the command's lifecycle
(signals, exit codes) and the memory watchdog."""
