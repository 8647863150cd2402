"""Task joins the patient compartment (by Task.for): index the Tasks already stored

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 06:30:00

R4 lists Task as never in the patient compartment, so Tasks written before this revision have no
compartment rows. The access policy now treats Task as patient data, so without rows those Tasks
would be hidden from the patients they are for (the policy fails closed); this fills the rows in
from each stored Task's current version, with the same extraction the store indexes with.
"""

import json

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    from gateway.fhir.indexer import compartment_patients

    conn = op.get_bind()
    resource = sa.table("resource", sa.column("pk"), sa.column("resource_type"), sa.column("content"),
                        sa.column("deleted"))
    compartment = sa.table("compartment", sa.column("resource_pk"), sa.column("resource_type"),
                           sa.column("patient_id"))
    rows = conn.execute(sa.select(resource.c.pk, resource.c.content).where(
        resource.c.resource_type == "Task", resource.c.deleted.is_(False))).all()
    pks = [row.pk for row in rows]
    for start in range(0, len(pks), 500):
        conn.execute(compartment.delete().where(compartment.c.resource_pk.in_(pks[start:start + 500])))
    values = []
    for row in rows:
        for patient_id in sorted(compartment_patients(json.loads(row.content))):
            values.append({"resource_pk": row.pk, "resource_type": "Task", "patient_id": patient_id})
    if values:
        conn.execute(compartment.insert(), values)


def downgrade() -> None:
    conn = op.get_bind()
    compartment = sa.table("compartment", sa.column("resource_type"))
    conn.execute(compartment.delete().where(compartment.c.resource_type == "Task"))
