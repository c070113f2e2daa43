"""The append-only admin audit trail (who, what, when, why of every admin call).

Revision ID: 0002
"""

from alembic import op

from runtime.audit import create_admin_audit_table_v1, drop_admin_audit_table_v1

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    create_admin_audit_table_v1(op)


def downgrade() -> None:
    drop_admin_audit_table_v1(op)
