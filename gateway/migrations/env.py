"""Alembic environment: runs on the connection `gateway db upgrade` hands over."""

from alembic import context
from sqlalchemy import create_engine

import gateway.portal.models
import gateway.smart_auth.models  # noqa: F401  (registers the SMART tables in the metadata)
from gateway.db import metadata

connection = context.config.attributes.get("connection")


def run() -> None:
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
