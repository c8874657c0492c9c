"""The web face of the daemon: the HTTP API, the WebSocket and the dashboard."""
