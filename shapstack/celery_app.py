"""A Celery app built from the environment, for Celery's own command line:

    celery -A shapstack.celery_app worker|inspect|flower ...

It reads the settings as every shapstack command does (SHAPSTACK_* variables, SHAPSTACK_CONFIG).
`shapstack worker` builds its app itself, from its own --config and --db.
"""

from shapstack.settings import load_settings
from workers.app import create_app

app = create_app(load_settings())
