"""The MCP front end: the server that exposes plugin tools and resources to assistants (stdio and HTTP) and
the pure policy that decides which tools a session sees."""
