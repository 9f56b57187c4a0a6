"""merch rules: pins, boosts, buries and synonyms applied by the search funnel

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('merch_rules',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('product_id', sa.String(length=128), nullable=True),
    sa.Column('brand', sa.String(length=256), nullable=True),
    sa.Column('position', sa.Integer(), nullable=True),
    sa.Column('factor', sa.Float(), nullable=True),
    sa.Column('term', sa.String(length=200), nullable=True),
    sa.Column('replacement', sa.String(length=500), nullable=True),
    sa.Column('category', sa.String(length=300), nullable=True),
    sa.Column('query_pattern', sa.String(length=200), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_by', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('pin', 'boost', 'bury', 'synonym')", name='ck_merch_rules_kind'),
    sa.CheckConstraint('position IS NULL OR position >= 1', name='ck_merch_rules_position'),
    sa.CheckConstraint('factor IS NULL OR factor > 0', name='ck_merch_rules_factor'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('merch_rules', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_merch_rules_product_id'), ['product_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('merch_rules', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_merch_rules_product_id'))
    op.drop_table('merch_rules')
