"""Cross-channel identity: an address may be held once verified and once as an unverified
claim (kept apart); the audit of merges, splits, links and erasures; web-chat verification
codes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 02:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("contact_identities", schema=None) as batch_op:
        batch_op.drop_constraint("uq_contact_identities_kind_address", type_="unique")
        batch_op.create_unique_constraint(
            "uq_contact_identities_kind_address_verified", ["kind", "address", "verified"]
        )
    op.create_table(
        "contact_links",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("contact_id", _ID, nullable=False),
        sa.Column("other_contact_id", _ID, nullable=True),
        sa.Column("identity_id", _ID, nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("detail", _JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contact_links")),
    )
    with op.batch_alter_table("contact_links", schema=None) as batch_op:
        batch_op.create_index("ix_contact_links_contact", ["contact_id", "id"], unique=False)
    op.create_table(
        "verification_codes",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("identity_id", _ID, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["identity_id"],
            ["contact_identities.id"],
            name=op.f("fk_verification_codes_identity_id_contact_identities"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verification_codes")),
    )
    with op.batch_alter_table("verification_codes", schema=None) as batch_op:
        batch_op.create_index(
            "ix_verification_codes_identity", ["identity_id", "id"], unique=False
        )


def downgrade() -> None:
    op.drop_table("verification_codes")
    op.drop_table("contact_links")
    with op.batch_alter_table("contact_identities", schema=None) as batch_op:
        batch_op.drop_constraint("uq_contact_identities_kind_address_verified", type_="unique")
        batch_op.create_unique_constraint(
            "uq_contact_identities_kind_address", ["kind", "address"]
        )
