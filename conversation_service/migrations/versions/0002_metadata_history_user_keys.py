"""metadata on conversations and messages, client keys, request ids unique per user, history index

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

- `metadata` (JSON object, default {}) on conversations and messages;
- `messages.client_key`: RecordMessage's Idempotency-Key, unique per user, apart from the
  agent's request ids;
- `messages.request_id` unique per user instead of per conversation (an Idempotency-Key
  belongs to the user). Earlier duplicates of one user's request id in several conversations
  keep it on their first message only;
- an index for ListHistory (the user's messages, newest first).

SQLite cannot drop a table's unique constraint in place: the batch operations rebuild the
messages table there (PostgreSQL gets plain ALTERs).
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

EMPTY_OBJECT = sa.text("'{}'")

# A request id already used by the same user on an earlier message (created earlier, or at the
# same moment in a lower conversation or position).
_LATER_DUPLICATES = """
UPDATE messages SET request_id = NULL
WHERE request_id IS NOT NULL AND EXISTS (
    SELECT 1 FROM messages AS earlier
    WHERE earlier.user_id = messages.user_id
      AND earlier.request_id = messages.request_id
      AND (
        earlier.created_at < messages.created_at
        OR (earlier.created_at = messages.created_at AND earlier.conversation_id < messages.conversation_id)
        OR (
          earlier.created_at = messages.created_at
          AND earlier.conversation_id = messages.conversation_id
          AND earlier.id < messages.id
        )
      )
)
"""


def upgrade() -> None:
    op.add_column("conversations", sa.Column("metadata", sa.JSON, nullable=False, server_default=EMPTY_OBJECT))
    op.execute("UPDATE messages SET request_id = NULL WHERE request_id = ''")
    op.execute(_LATER_DUPLICATES)
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("metadata", sa.JSON, nullable=False, server_default=EMPTY_OBJECT))
        batch.add_column(sa.Column("client_key", sa.String(255), nullable=True))
        batch.drop_constraint("uq_messages_conversation_request", type_="unique")
        batch.create_unique_constraint("uq_messages_user_request", ["user_id", "request_id"])
        batch.create_unique_constraint("uq_messages_user_client_key", ["user_id", "client_key"])
    op.create_index("ix_messages_user_created", "messages", ["user_id", "created_at", "conversation_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_messages_user_created", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_constraint("uq_messages_user_client_key", type_="unique")
        batch.drop_constraint("uq_messages_user_request", type_="unique")
        batch.create_unique_constraint("uq_messages_conversation_request", ["user_id", "conversation_id", "request_id"])
        batch.drop_column("client_key")
        batch.drop_column("metadata")
    op.drop_column("conversations", "metadata")
