"""Request ids of users' own requests are kept in one place, whichever edge (the gateway, the
admin console) carried them: the console's join the gateway's (`runtime.migrations
.merge_edge_request_ids`). One request id sent through both was applied twice (review R7).

Revision ID: 0008
Revises: 0007
"""

from alembic import op

from runtime.migrations import merge_edge_request_ids

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    merge_edge_request_ids(op)


def downgrade() -> None:
    pass  # the older code looks the console's records up under its own name, as it did before
