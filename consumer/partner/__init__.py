"""The partner edge: client, content, scheduling, executor. Imports core and shared, not kafka."""
