"""The stages both modes run: the embedded runner calls them in a loop, each Celery task calls one.

ingest (jobs.ingest) -> infer a batch (jobs.infer) -> stack a batch (jobs.stack) -> aggregate
(jobs.aggregate); jobs.classify chains them for the embedded mode. They take a session factory
and plain values, never the CLI's settings type, so the CLI, the workers, train, benchmarks and
tests call them alike.
"""
