"""The ops surface (HTTP, logs, admin, dry run); imports core, the edges and shared, never app."""
