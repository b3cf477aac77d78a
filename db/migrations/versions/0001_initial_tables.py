"""initial tables

Revision ID: 0001
Revises: 
Create Date: 2026-11-20
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_versions',
    sa.Column('id', sa.String(length=80), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('preset', sa.String(length=32), nullable=True),
    sa.Column('path', sa.Text(), nullable=True),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('feed', sa.Text(), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('bundle_id', sa.String(length=80), nullable=True),
    sa.Column('stacker', sa.String(length=32), nullable=True),
    sa.Column('n_rows', sa.Integer(), nullable=False),
    sa.Column('n_products', sa.Integer(), nullable=False),
    sa.Column('n_rejects', sa.Integer(), nullable=False),
    sa.Column('timings', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('collapse_metrics',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('scope', sa.String(length=256), nullable=False),
    sa.Column('metric', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'scope', 'metric', name='uq_collapse_metric')
    )
    with op.batch_alter_table('collapse_metrics', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_collapse_metrics_run_id'), ['run_id'], unique=False)

    op.create_table('products',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('product_id', sa.String(length=128), nullable=False),
    sa.Column('row', sa.Integer(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('title', sa.Text(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('image', sa.Text(), nullable=True),
    sa.Column('label', sa.String(length=256), nullable=True),
    sa.Column('group_id', sa.String(length=256), nullable=True),
    sa.Column('attributes', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'product_id', name='uq_products_run_product')
    )
    with op.batch_alter_table('products', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_products_content_hash'), ['content_hash'], unique=False)
        batch_op.create_index('ix_products_run_status', ['run_id', 'status'], unique=False)

    op.create_table('rejects',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('row', sa.Integer(), nullable=False),
    sa.Column('raw_id', sa.String(length=256), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rejects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rejects_run_id'), ['run_id'], unique=False)

    op.create_table('base_logits',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('product_pk', sa.Integer(), nullable=False),
    sa.Column('model_kind', sa.String(length=16), nullable=False),
    sa.Column('model_version', sa.String(length=80), nullable=False),
    sa.Column('logits', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['model_version'], ['model_versions.id'], ),
    sa.ForeignKeyConstraint(['product_pk'], ['products.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('product_pk', 'model_kind', 'model_version', name='uq_base_logits')
    )
    op.create_table('dead_letters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('product_pk', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['product_pk'], ['products.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('product_pk', 'stage', name='uq_dead_letters')
    )
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dead_letters_run_id'), ['run_id'], unique=False)

    op.create_table('modality_contributions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('product_pk', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('t_shap', sa.Float(), nullable=False),
    sa.Column('v_shap', sa.Float(), nullable=False),
    sa.Column('n_evaluations', sa.Integer(), nullable=False),
    sa.Column('stderr', sa.Float(), nullable=False),
    sa.Column('mode', sa.String(length=8), nullable=False),
    sa.ForeignKeyConstraint(['product_pk'], ['products.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('product_pk', name='uq_contributions_product')
    )
    with op.batch_alter_table('modality_contributions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_modality_contributions_run_id'), ['run_id'], unique=False)

    op.create_table('predictions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('product_pk', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('category', sa.String(length=256), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('model_version', sa.String(length=80), nullable=False),
    sa.Column('stacker', sa.String(length=32), nullable=False),
    sa.Column('text_category', sa.String(length=256), nullable=True),
    sa.Column('image_category', sa.String(length=256), nullable=True),
    sa.Column('multimodal_category', sa.String(length=256), nullable=True),
    sa.Column('missing', sa.String(length=16), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_version'], ['model_versions.id'], ),
    sa.ForeignKeyConstraint(['product_pk'], ['products.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('product_pk', 'stacker', name='uq_predictions_product_stacker')
    )
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_predictions_run_id'), ['run_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_predictions_run_id'))

    op.drop_table('predictions')
    with op.batch_alter_table('modality_contributions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_modality_contributions_run_id'))

    op.drop_table('modality_contributions')
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dead_letters_run_id'))

    op.drop_table('dead_letters')
    op.drop_table('base_logits')
    with op.batch_alter_table('rejects', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rejects_run_id'))

    op.drop_table('rejects')
    with op.batch_alter_table('products', schema=None) as batch_op:
        batch_op.drop_index('ix_products_run_status')
        batch_op.drop_index(batch_op.f('ix_products_content_hash'))

    op.drop_table('products')
    with op.batch_alter_table('collapse_metrics', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_collapse_metrics_run_id'))

    op.drop_table('collapse_metrics')
    op.drop_table('runs')
    op.drop_table('model_versions')
