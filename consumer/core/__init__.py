"""The pure core: event, view, delta, state record. Imports only consumer.errors and itself."""
