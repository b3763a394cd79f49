"""Delta planning: the partner operations and state records one event causes.

Pure functions of the published view, the routing table and the event. Time comes from the
events: a document carries ``seen_at``; a manifest withdraws only documents seen before its
``taken_at``; a document-created event at or before the newest manifest applied for its module
is already decided by that manifest. The planner never deletes what the relay did not publish.
"""
