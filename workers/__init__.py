"""The distributed mode: a Celery app whose tasks are thin wrappers over db.runs' stage functions.

`workers.app` is the app (`celery -A workers.app ...`), `workers.tasks` the tasks, `workers.queues`
the routing; docs/operations.md says how to run it.
"""
