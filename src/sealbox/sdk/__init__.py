"""`Sandbox` (sync) and `AsyncSandbox`: one API over an embedded engine or a remote server."""
