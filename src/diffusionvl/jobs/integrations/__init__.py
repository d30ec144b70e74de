"""Optional integrations with other tools (imported only when used; their packages are optional extras)."""
