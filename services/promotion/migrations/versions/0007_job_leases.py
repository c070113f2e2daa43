"""The periodic jobs' lease (runtime.leadership): one replica at a time runs them.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

from runtime.leadership import downgrade_job_leases, upgrade_job_leases

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    upgrade_job_leases(op)


def downgrade() -> None:
    downgrade_job_leases(op)
