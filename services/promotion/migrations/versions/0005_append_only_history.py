"""History cannot be rewritten with the service's own credentials.

On PostgreSQL the service acts as a role without UPDATE, DELETE or TRUNCATE on the admin audit trail
(its triggers came with it).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

from runtime.migrations import grant_service_role

revision = "0005"
down_revision = "0004"
APPEND_ONLY = ("admin_audit",)


def upgrade() -> None:
    grant_service_role(op, append_only=APPEND_ONLY)


def downgrade() -> None:
    pass  # the role's grants go with the tables; the role is shared by the cluster's databases
