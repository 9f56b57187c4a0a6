"""ingest job items: per-record status of a queued ingest job

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ingest_job_items',
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('product_id', sa.String(length=128), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('has_image', sa.Boolean(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['ingest_jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'position')
    )
    with op.batch_alter_table('ingest_job_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ingest_job_items_status'), ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('ingest_job_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ingest_job_items_status'))
    op.drop_table('ingest_job_items')
