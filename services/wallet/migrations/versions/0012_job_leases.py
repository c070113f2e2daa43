"""The periodic jobs' lease (runtime.leadership): one replica at a time runs them.

Revision ID: 0012
Revises: 0011
"""

from alembic import op

from runtime.leadership import downgrade_job_leases, upgrade_job_leases

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    upgrade_job_leases(op)


def downgrade() -> None:
    downgrade_job_leases(op)
